"""A pod's port on a loopback address, through the Kubernetes API's pods/portforward subresource, as
`kubectl port-forward` gives it: for an API running outside the cluster, where pod and Service addresses
are out of reach (make dev, e2e, kind).

kubernetes_asyncio opens the websocket with the ApiClient's TLS and credentials (WsApiClient) but has no
port-forward on top of it, so the framing and the listeners are ours.

Framing (subprotocol v4.channel.k8s.io, one port per websocket): each message is one channel byte and
its payload; channel 0 carries the port's data, channel 1 its errors. The first message the server sends
on each channel is the port number (2 bytes, little-endian); what the client sends carries no port.

One loopback listener per pod; each TCP connection accepted there gets its own websocket (the protocol
has no per-connection streams). Listeners idle longer than `idle_seconds` are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from dataclasses import dataclass, field

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.stream import WsApiClient

log = logging.getLogger("agentbox.api.portforward")

DATA_CHANNEL = 0
ERROR_CHANNEL = 1
_PORT_PREFIX_BYTES = 2
_READ_CHUNK = 65_536


class PortForwardError(Exception):
    """The pod's port could not be reached through the Kubernetes API."""


def data_message(payload: bytes) -> bytes:
    """A client-to-pod message on the data channel."""
    return bytes([DATA_CHANNEL]) + payload


@dataclass
class Demultiplexer:
    """Splits the server's messages into (channel, payload), dropping each channel's leading port number."""

    port: int
    _awaiting_port: set[int] = field(default_factory=lambda: {DATA_CHANNEL, ERROR_CHANNEL})

    def feed(self, message: bytes) -> tuple[int, bytes]:
        if not message:
            raise PortForwardError("an empty port-forward message (no channel byte)")
        channel, payload = message[0], message[1:]
        if channel not in (DATA_CHANNEL, ERROR_CHANNEL):
            raise PortForwardError(f"a port-forward message on unknown channel {channel}")
        if channel in self._awaiting_port:
            if len(payload) < _PORT_PREFIX_BYTES:
                raise PortForwardError(f"channel {channel} opened without its port number")
            announced = int.from_bytes(payload[:_PORT_PREFIX_BYTES], "little")
            if announced != self.port:
                raise PortForwardError(f"channel {channel} opened for port {announced}, not {self.port}")
            self._awaiting_port.discard(channel)
            payload = payload[_PORT_PREFIX_BYTES:]
        return channel, payload


@dataclass
class _Listener:
    sock: socket.socket
    server: asyncio.Task[asyncio.Server]
    last_used: float = field(default_factory=time.monotonic)
    connections: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def close(self) -> None:
        for task in self.connections:
            task.cancel()
        with contextlib.suppress(Exception):
            server = await self.server
            server.close()
            await server.wait_closed()
        self.sock.close()


class PortForwarder:
    """Loopback listeners that reach a port of a pod through the Kubernetes API, one per pod and port."""

    def __init__(self, configuration: client.Configuration, *, idle_seconds: float = 300,
                 connect_timeout: float = 10) -> None:
        self._api = WsApiClient(configuration=configuration)
        self._core = client.CoreV1Api(self._api)
        self.idle_seconds = idle_seconds
        self.connect_timeout = connect_timeout
        self._listeners: dict[tuple[str, str, int], _Listener] = {}
        self._sweeper: asyncio.Task[None] | None = None

    def local_url(self, namespace: str, pod: str, port: int) -> str:
        """http://127.0.0.1:<local port> that leads to the pod's port. Synchronous, so that the callers'
        own synchronous URL lookups can use it: the socket listens at once, accepting starts with the loop."""
        key = (namespace, pod, port)
        listener = self._listeners.get(key)
        if listener is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            sock.setblocking(False)
            listener = _Listener(sock, asyncio.create_task(
                asyncio.start_server(lambda r, w: self._accepted(key, r, w), sock=sock)))
            self._listeners[key] = listener
            if self._sweeper is None:
                self._sweeper = asyncio.create_task(self._sweep(), name="portforward-sweeper")
        listener.last_used = time.monotonic()
        return listener.url

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for listener in self._listeners.values():
            await listener.close()
        self._listeners.clear()
        await self._api.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.idle_seconds / 2)
            cutoff = time.monotonic() - self.idle_seconds
            for key, listener in list(self._listeners.items()):
                if not listener.connections and listener.last_used < cutoff:
                    del self._listeners[key]
                    await listener.close()

    async def _accepted(self, key: tuple[str, str, int], reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
        listener = self._listeners.get(key)
        task = asyncio.current_task()
        if listener is None or task is None:
            writer.close()
            return
        listener.connections.add(task)
        try:
            await self._pipe(*key, reader, writer)
        except PortForwardError as exc:
            # The caller sees the connection close without an answer: the pod is not reachable.
            log.warning("port-forward to pod %s/%s port %d failed: %s", *key, exc)
        finally:
            listener.connections.discard(task)
            listener.last_used = time.monotonic()
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _open(self, namespace: str, pod: str, port: int) -> aiohttp.ClientWebSocketResponse:
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await (await self._core.connect_get_namespaced_pod_portforward(
                    pod, namespace, ports=port, _preload_content=False))
        except aiohttp.WSServerHandshakeError as exc:
            raise PortForwardError(f"the Kubernetes API refused the port-forward ({exc.status})") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise PortForwardError(f"the Kubernetes API did not answer ({type(exc).__name__})") from exc

    async def _pipe(self, namespace: str, pod: str, port: int, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        ws = await self._open(namespace, pod, port)
        demultiplexer = Demultiplexer(port)

        async def to_pod() -> None:
            while data := await reader.read(_READ_CHUNK):
                await ws.send_bytes(data_message(data))

        async def from_pod() -> None:
            async for message in ws:
                if message.type != aiohttp.WSMsgType.BINARY:
                    break
                channel, payload = demultiplexer.feed(message.data)
                if channel == ERROR_CHANNEL and payload:
                    raise PortForwardError(payload.decode(errors="replace"))
                if payload:
                    writer.write(payload)
                    await writer.drain()

        sides = [asyncio.create_task(to_pod()), asyncio.create_task(from_pod())]
        try:
            done, _ = await asyncio.wait(sides, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if isinstance(task.exception(), PortForwardError):
                    raise task.exception()
        finally:
            for task in sides:
                task.cancel()
            await asyncio.gather(*sides, return_exceptions=True)
            await ws.close()
