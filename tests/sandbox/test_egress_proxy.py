"""The egress proxy against fake providers and hosts on loopback: the key goes to the provider's upstream
only, in the provider's header, never what the agent sent; CONNECT reaches allow-listed hosts only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from agentbox.sandbox.egress.__main__ import serve
from agentbox.sandbox.egress.config import ConfigError, EgressConfig, load
from agentbox.sandbox.egress.tunnel import host_allowed

KEY = "sk-real-provider-key-0123456789"
PLACEHOLDER = "agentbox-placeholder-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def _until_listening(port: int) -> None:
    for _ in range(200):
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"nothing listens on {port}")


class FakeProvider:
    """Records every request it gets; /v1/redirect sends the client elsewhere."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []
        self.port = free_port()

    def app(self) -> Starlette:
        async def record(request: Request) -> JSONResponse:
            body = await request.body()
            self.seen.append({"path": request.url.path, "query": str(request.url.query),
                              "headers": dict(request.headers), "body": body.decode()})
            return JSONResponse({"ok": True, "path": request.url.path})

        async def redirect(_: Request) -> RedirectResponse:
            return RedirectResponse("http://127.0.0.1:9/elsewhere", status_code=307)

        return Starlette(routes=[Route("/v1/redirect", redirect, methods=["POST"]),
                                 Route("/{path:path}", record, methods=["GET", "POST"])])


@contextlib.asynccontextmanager
async def running(coroutine_factory, port: int) -> AsyncIterator[None]:
    task = asyncio.create_task(coroutine_factory())
    try:
        await _until_listening(port)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture
async def fake_provider() -> AsyncIterator[FakeProvider]:
    provider = FakeProvider()
    server = uvicorn.Server(uvicorn.Config(provider.app(), host="127.0.0.1", port=provider.port,
                                           log_config=None, lifespan="off"))
    async with running(server.serve, provider.port):
        yield provider
    server.should_exit = True


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(b"echo:" + data)
        await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def proxy(tmp_path: Path, provider_port: int | None, allow: list[str], connect_ports: list[int],
                allow_private: bool = True) -> AsyncIterator[EgressConfig]:
    key_file = tmp_path / "provider-key"
    key_file.write_text(KEY + "\n")
    raw = {"listen": {"host": "127.0.0.1", "port": free_port(), "connectPort": free_port()},
           "allow": allow, "connectPorts": connect_ports, "allowPrivateNetworks": allow_private}
    if provider_port is not None:
        raw["provider"] = {"name": "anthropic", "upstream": f"http://127.0.0.1:{provider_port}",
                           "keyHeader": "x-api-key", "keyFile": str(key_file)}
    path = tmp_path / "egress.json"
    path.write_text(json.dumps(raw))
    config = load(path)
    async with running(lambda: serve(config), config.listen.port):
        await _until_listening(config.listen.connect_port)
        yield config


async def test_the_key_replaces_whatever_the_agent_sent_on_the_provider_route(tmp_path, fake_provider):
    async with proxy(tmp_path, fake_provider.port, [], [443]) as config, httpx.AsyncClient() as client:
        answer = await client.post(
            f"http://127.0.0.1:{config.listen.port}/anthropic/v1/messages?beta=true",
            headers={"x-api-key": PLACEHOLDER, "authorization": f"Bearer {PLACEHOLDER}",
                     "anthropic-version": "2023-06-01"}, json={"model": "m", "messages": []})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"ok": True, "path": "/v1/messages"}
    [seen] = fake_provider.seen
    headers = seen["headers"]
    assert headers["x-api-key"] == KEY
    assert "authorization" not in headers, "the agent's own credential headers are dropped"
    assert headers["anthropic-version"] == "2023-06-01", "other headers go on"
    assert seen["query"] == "beta=true" and json.loads(seen["body"])["model"] == "m"
    assert PLACEHOLDER not in json.dumps(seen)


async def test_only_the_sessions_provider_is_routed(tmp_path, fake_provider):
    async with proxy(tmp_path, fake_provider.port, [], [443]) as config, httpx.AsyncClient() as client:
        other = await client.post(f"http://127.0.0.1:{config.listen.port}/openai/v1/responses",
                                  headers={"authorization": f"Bearer {PLACEHOLDER}"}, json={})
    assert other.status_code == 404
    assert "only /anthropic/ is routed" in other.json()["detail"]
    assert fake_provider.seen == [], "nothing reached an upstream"


async def test_a_redirect_is_handed_back_unfollowed(tmp_path, fake_provider):
    async with proxy(tmp_path, fake_provider.port, [], [443]) as config, httpx.AsyncClient() as client:
        answer = await client.post(f"http://127.0.0.1:{config.listen.port}/anthropic/v1/redirect", json={})
    assert answer.status_code == 307
    assert answer.headers["location"] == "http://127.0.0.1:9/elsewhere"


async def test_without_a_provider_key_every_route_is_404(tmp_path):
    async with proxy(tmp_path, None, [], [443]) as config, httpx.AsyncClient() as client:
        answer = await client.get(f"http://127.0.0.1:{config.listen.port}/anthropic/v1/models")
        health = await client.get(f"http://127.0.0.1:{config.listen.port}/healthz")
    assert answer.status_code == 404 and "no provider key" in answer.json()["detail"]
    assert health.status_code == 200


async def _connect(port: int, target: str, then: bytes = b"") -> tuple[bytes, bytes]:
    """CONNECT through the proxy; (answer head, what came back for `then` through the tunnel)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    echoed = b""
    if head.startswith(b"HTTP/1.1 200") and then:
        writer.write(then)
        await writer.drain()
        echoed = await asyncio.wait_for(reader.read(1024), 10)
    else:
        echoed = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return head, echoed


async def test_connect_tunnels_to_an_allowed_host(tmp_path, echo_port):
    async with proxy(tmp_path, None, ["localhost"], [echo_port]) as config:
        head, echoed = await _connect(config.listen.connect_port, f"localhost:{echo_port}", b"hello")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert echoed == b"echo:hello"


async def test_connect_refuses_a_host_not_on_the_allow_list(tmp_path, echo_port, caplog):
    async with proxy(tmp_path, None, ["*.example.org"], [echo_port]) as config:
        head, body = await _connect(config.listen.connect_port, f"localhost:{echo_port}")
    assert head.startswith(b"HTTP/1.1 403 Forbidden"), head
    assert b"egress to localhost is not allowed" in body and b"spec.egress.allow" in body
    assert any("egress refused" in record.getMessage() for record in caplog.records)


async def test_connect_refuses_other_ports_and_plain_http(tmp_path, echo_port):
    async with proxy(tmp_path, None, ["localhost"], [443]) as config:
        head, body = await _connect(config.listen.connect_port, f"localhost:{echo_port}")
        assert head.startswith(b"HTTP/1.1 403") and f"port {echo_port}".encode() in body
        reader, writer = await asyncio.open_connection("127.0.0.1", config.listen.connect_port)
        writer.write(b"GET http://localhost/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
        plain = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert plain.startswith(b"HTTP/1.1 405") and b"only HTTPS is proxied" in plain


async def test_connect_refuses_an_allowed_name_that_resolves_to_a_private_address(tmp_path, echo_port):
    async with proxy(tmp_path, None, ["localhost"], [echo_port], allow_private=False) as config:
        head, body = await _connect(config.listen.connect_port, f"localhost:{echo_port}")
    assert head.startswith(b"HTTP/1.1 403")
    assert b"resolves to a private, loopback" in body


@pytest.mark.parametrize(("host", "allowed"), [
    ("api.github.com", True), ("API.GitHub.com.", True), ("github.com", False), ("x.npmjs.org", True),
    ("a.b.npmjs.org", True), ("npmjs.org", False), ("evilnpmjs.org", False), ("api.github.com.evil", False)])
def test_host_patterns(host, allowed):
    assert host_allowed(host, ["api.github.com", "*.npmjs.org"]) is allowed


def test_a_plain_http_upstream_is_refused_unless_on_loopback(tmp_path):
    path = tmp_path / "egress.json"
    path.write_text(json.dumps({"provider": {"name": "openai", "upstream": "http://api.openai.com/v1",
                                             "keyHeader": "authorization", "keyFile": "/x"}}))
    with pytest.raises(ConfigError, match=r"provider\.upstream: .*https://"):
        load(path)
