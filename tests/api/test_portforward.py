"""The port-forward framing (v4.channel.k8s.io), without I/O."""

from __future__ import annotations

import pytest

from agentbox.api import portforward
from agentbox.api.portforward import DATA_CHANNEL, ERROR_CHANNEL, Demultiplexer, PortForwardError

PORT = 3284
PORT_PREFIX = PORT.to_bytes(2, "little")  # b"\xd4\x0c", as a kwok node sends it


def test_what_the_client_sends_is_the_data_channel_byte_and_the_bytes():
    assert portforward.data_message(b"GET / HTTP/1.1\r\n") == b"\x00GET / HTTP/1.1\r\n"


def test_each_channel_opens_with_the_port_which_is_dropped_once():
    frames = Demultiplexer(PORT)
    assert frames.feed(bytes([DATA_CHANNEL]) + PORT_PREFIX) == (DATA_CHANNEL, b"")
    assert frames.feed(bytes([ERROR_CHANNEL]) + PORT_PREFIX) == (ERROR_CHANNEL, b"")
    # Later bytes that happen to look like a port number are data.
    looks_like_a_port = PORT_PREFIX + b"HTTP/1.1 200"
    assert frames.feed(bytes([DATA_CHANNEL]) + looks_like_a_port) == (DATA_CHANNEL, looks_like_a_port)
    assert frames.feed(b"\x01error forwarding port") == (ERROR_CHANNEL, b"error forwarding port")


def test_data_in_the_opening_message_follows_the_port():
    assert Demultiplexer(PORT).feed(b"\x00" + PORT_PREFIX + b"hello") == (DATA_CHANNEL, b"hello")


@pytest.mark.parametrize(("message", "complaint"), [
    (b"", "no channel byte"),
    (b"\x02" + PORT_PREFIX, "unknown channel 2"),
    (b"\x00\xd4", "without its port number"),
    (b"\x00" + (8080).to_bytes(2, "little"), "port 8080, not 3284"),
])
def test_malformed_openings_are_refused_by_name(message, complaint):
    with pytest.raises(PortForwardError, match=complaint):
        Demultiplexer(PORT).feed(message)
