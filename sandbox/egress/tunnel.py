"""The CONNECT proxy (the agent's HTTPS_PROXY): tunnels to hosts on the session's allow-list only.

A tunnel carries TLS end to end: the proxy sees the host name and port the client asks for, never the
content, and adds nothing to it (no credential goes through a tunnel). Refusals are 403 answers that
name the host and the field that would allow it, and a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable
from http import HTTPStatus

import h11

log = logging.getLogger("agentbox.egress")

HEAD_LIMIT = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 15.0
CHUNK = 64 * 1024


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def host_allowed(host: str, allow: Iterable[str]) -> bool:
    """`host` is listed, or falls under a listed *.domain (the domain itself is not)."""
    host = host.lower().rstrip(".")
    for pattern in allow:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise Refused(400, f"CONNECT target {target!r} is not host:port")
    return host.strip("[]"), int(port)


def _address_refusal(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return None if address.is_global else "a private, loopback, link-local or reserved address"


class TunnelProxy:
    def __init__(self, allow: list[str], ports: list[int], *, allow_private_networks: bool = False) -> None:
        self.allow = allow
        self.ports = ports
        self.allow_private_networks = allow_private_networks

    async def _destination(self, target: str) -> tuple[str, str, int]:
        """(host, address to connect to, port) for an allowed target, else Refused."""
        host, port = _split_target(target)
        if port not in self.ports:
            ports = ", ".join(map(str, self.ports))
            raise Refused(403, f"egress to port {port} is not allowed (only {ports})")
        if not host_allowed(host, self.allow):
            raise Refused(403, f"egress to {host} is not allowed: it is not on the session's allow-list "
                               "(spec.egress.allow)")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            raise Refused(502, f"cannot resolve {host}") from error
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        if not self.allow_private_networks:
            for address in addresses:
                why = _address_refusal(address)
                if why:  # every address is checked: the one connected to is one of them
                    raise Refused(403, f"egress to {host} is not allowed: it resolves to {why} ({address})")
        return host, str(addresses[0]), port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError, h11.ProtocolError):
            pass  # a client that went away or spoke no HTTP: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
        request = await asyncio.wait_for(self._request(connection, reader), HEAD_TIMEOUT)
        if request is None:
            return
        target = request.target.decode("ascii", "replace")
        try:
            if request.method != b"CONNECT":
                raise Refused(405, "only HTTPS is proxied (CONNECT host:443); plain HTTP is refused")
            host, address, port = await self._destination(target)
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(address, port), CONNECT_TIMEOUT)
            except (OSError, TimeoutError) as error:
                raise Refused(502, f"cannot connect to {host}:{port} ({type(error).__name__})") from error
        except Refused as refusal:
            log.warning("egress refused", extra={"target": target, "status": refusal.status,
                                                 "reason": refusal.reason})
            body = f"{refusal.reason}\n".encode()
            writer.write(connection.send(h11.Response(
                status_code=refusal.status, reason=HTTPStatus(refusal.status).phrase.encode(),
                headers=[("content-type", "text/plain; charset=utf-8"), ("content-length", str(len(body))),
                         ("connection", "close")])) or b"")
            writer.write(connection.send(h11.Data(data=body)) or b"")
            writer.write(connection.send(h11.EndOfMessage()) or b"")
            await writer.drain()
            return
        log.info("egress tunnel", extra={"host": host, "port": port})
        writer.write(connection.send(h11.Response(status_code=200, headers=[])) or b"")
        early, _ = connection.trailing_data  # what the client sent after the CONNECT head (a TLS hello)
        try:
            if early:
                upstream_writer.write(early)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            upstream_writer.close()

    @staticmethod
    async def _request(connection: h11.Connection, reader: asyncio.StreamReader) -> h11.Request | None:
        """The request head; for CONNECT, read through its (empty) end, so h11 can switch to the tunnel."""
        request = None
        while True:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                return None
            if isinstance(event, h11.Request):
                request = event
                if event.method != b"CONNECT":
                    return request
            elif isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                return request
            elif event is h11.NEED_DATA:
                data = await reader.read(CHUNK)
                connection.receive_data(data)
                if not data:
                    return None
            else:
                return None


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
