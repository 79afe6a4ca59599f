"""Request size limits: the body cap (Content-Length or streamed chunked, both 413 problems) and the header
cap, which lives in the HTTP server, so it is tested against `python -m agentbox.api` itself: the process
the chart and the image run, on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import Request

from agentbox.api.app import Services, create_app
from agentbox.api.settings import Settings

BODY_LIMIT = 4096
HEADER_LIMIT = 8192


async def chunks(total: int, size: int = 1024) -> AsyncIterator[bytes]:
    """A body of `total` bytes sent as chunked transfer encoding (no Content-Length)."""
    for start in range(0, total, size):
        yield b"x" * min(size, total - start)


def echo_app() -> httpx.AsyncClient:
    app = create_app(services_override=Services(settings=Settings(max_body_bytes=BODY_LIMIT)))

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, int]:
        return {"received": len(await request.body())}

    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test")


def assert_too_large(response: httpx.Response) -> None:
    assert response.status_code == 413, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Content Too Large"
    assert f"exceeds {BODY_LIMIT} bytes" in response.json()["detail"]


async def test_a_streamed_body_is_delivered_whole_up_to_the_limit_and_refused_past_it():
    async with echo_app() as api:
        within = await api.post("/echo", content=chunks(BODY_LIMIT))
        assert within.status_code == 200 and within.json() == {"received": BODY_LIMIT}
        assert_too_large(await api.post("/echo", content=chunks(BODY_LIMIT + 1)))


async def test_a_chunked_body_over_the_limit_is_a_413_problem_from_a_validated_route():
    # The route's own body model reads the body (FastAPI's parsing, not request.body()).
    async with echo_app() as api:
        response = await api.post("/api/v1/mcp/test", content=chunks(BODY_LIMIT * 2),
                                  headers={"Content-Type": "application/json"})
    assert_too_large(response)
    assert response.json()["instance"] == "/api/v1/mcp/test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.asynccontextmanager
async def api_process(**settings: str) -> AsyncIterator[int]:
    """`python -m agentbox.api` with `settings` (AGENTBOX_* without the prefix) until the block ends; yields
    its port. No Kubernetes (KUBECONFIG points nowhere) and no database: limits apply before either."""
    port = free_port()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("AGENTBOX_", "KUBERNETES_"))}
    env.update({f"AGENTBOX_{name.upper()}": value for name, value in settings.items()})
    env.update(AGENTBOX_HOST="127.0.0.1", AGENTBOX_PORT=str(port), AGENTBOX_LOG_LEVEL="WARNING",
               KUBECONFIG=os.devnull)
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "agentbox.api", env=env,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.DEVNULL)
    try:
        async with httpx.AsyncClient(timeout=1) as http:
            for _ in range(300):
                assert process.returncode is None, "the API exited"
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{port}/livez")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the API did not answer /livez within 30 s")
        yield port
    finally:
        process.terminate()
        await process.wait()


@pytest.fixture(scope="module")
async def api_port() -> AsyncIterator[int]:
    async with api_process(max_body_bytes=str(BODY_LIMIT), max_header_bytes=str(HEADER_LIMIT)) as port:
        yield port


async def raw_request(port: int, header_value_bytes: int, piece: int | None = None) -> str:
    """GET /livez with one header of `header_value_bytes`, written whole or in pieces of `piece` bytes
    (as a network delivers a large header block) until the server answers; answers the status line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (b"GET /livez HTTP/1.1\r\nHost: api.test\r\nX-Padding: " + b"a" * header_value_bytes +
               b"\r\nConnection: close\r\n\r\n")
    piece = piece or len(request)
    answer = asyncio.create_task(reader.readline())
    try:
        with contextlib.suppress(ConnectionError):  # a server that refused closes while we still write
            for start in range(0, len(request), piece):
                if answer.done():
                    break
                writer.write(request[start:start + piece])
                await writer.drain()
                await asyncio.sleep(0.002)  # each piece its own read on the server side
        return (await asyncio.wait_for(answer, 10)).decode().strip() or "closed without an answer"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_the_served_api_refuses_a_chunked_body_over_the_limit_with_a_413_problem(api_port):
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}") as http:
        assert_too_large(await http.post("/api/v1/sessions", content=chunks(BODY_LIMIT * 2),
                                         headers={"Content-Type": "application/json"}))
        assert_too_large(await http.post("/api/v1/sessions", content=b"x" * (BODY_LIMIT + 1),
                                         headers={"Content-Type": "application/json"}))


async def test_the_served_api_refuses_a_header_block_over_the_limit(api_port):
    assert await raw_request(api_port, HEADER_LIMIT // 2) == "HTTP/1.1 200 OK"
    assert await raw_request(api_port, HEADER_LIMIT // 2, piece=512) == "HTTP/1.1 200 OK"
    # uvicorn answers h11's refusal of an incomplete header block past the limit with 400 (not 431).
    assert await raw_request(api_port, HEADER_LIMIT * 2, piece=512) == "HTTP/1.1 400 Bad Request"
    assert await raw_request(api_port, 16 * 1024 * 1024, piece=65536) == "HTTP/1.1 400 Bad Request"
    # The server is still there for the next caller.
    assert await raw_request(api_port, 16) == "HTTP/1.1 200 OK"
