"""The tool-call leg to an upstream: the single POST (gateway/wire.py) against a real HTTP server on
loopback that answers the ways an MCP server on the 2026-07-28 wire may (JSON, an event stream, errors,
a redirect); what `_meta` crosses; the FastMCP result type the leg relies on."""

from __future__ import annotations

import json

import pytest
from aiohttp import web
from fastmcp.tools import ToolResult
from fastmcp.tools.base import RawStructuredToolResult
from mcp.shared.exceptions import MCPError
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
    TextContent,
)

from agentbox.sandbox.gateway.upstream import crossing
from agentbox.sandbox.gateway.wire import PostDispatcher, env_proxy

SEEN = web.AppKey("seen", list)


async def answer(request: web.Request) -> web.StreamResponse:
    message = await request.json()
    request.app[SEEN].append((dict(request.headers), message))
    reply = {"jsonrpc": "2.0", "id": message["id"], "result": {"echo": message.get("params")}}
    how = request.match_info["how"]
    if how == "json":
        return web.json_response(reply)
    if how == "events":
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        progress = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {"progress": 1}}
        other = {"jsonrpc": "2.0", "id": "someone-else", "result": {}}
        # A comment ping, a notification, an answer to another id, then ours over several data lines.
        body = ": ping\r\n\r\n" + "".join(f"event: message\r\ndata: {json.dumps(item)}\r\n\r\n"
                                          for item in (progress, other))
        body += "".join(f"data: {line}\r\n" for line in json.dumps(reply, indent=1).splitlines()) + "\r\n"
        await stream.write(body.encode())
        return stream
    if how == "rpc-error":
        return web.json_response({"jsonrpc": "2.0", "id": message["id"],
                                  "error": {"code": -32602, "message": "no such tool"}}, status=400)
    if how == "redirect":
        raise web.HTTPTemporaryRedirect("/json")
    if how == "cut":
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        await stream.write(b": ping\r\n\r\n")
        return stream
    return web.Response(status=500, text="boom")


@pytest.fixture
async def server():
    app = web.Application()
    app[SEEN] = []
    app.router.add_post("/{how}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", app[SEEN]
    await runner.cleanup()


@pytest.fixture
async def posts():
    made: list[PostDispatcher] = []

    def make(url: str) -> PostDispatcher:
        made.append(PostDispatcher(url, {"Authorization": "Bearer upstream"}))
        return made[-1]

    yield make
    for dispatcher in made:
        await dispatcher.aclose()


async def test_a_json_answer_is_the_result_and_only_the_upstreams_headers_are_sent(server, posts):
    base, seen = server
    dispatcher = posts(f"{base}/json")
    options = {"headers": {"Mcp-Method": "tools/call"}}
    assert await dispatcher.send_raw_request("tools/call", {"name": "x"}, options) == {"echo": {"name": "x"}}
    assert await dispatcher.send_raw_request("ping", None) == {"echo": None}
    headers, message = seen[0]
    assert headers["Authorization"] == "Bearer upstream" and headers["Mcp-Method"] == "tools/call"
    assert headers["Accept"] == "application/json, text/event-stream"
    assert message == {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "x"}}
    assert seen[1][1]["id"] == 2 and "params" not in seen[1][1]


async def test_an_event_stream_answer_skips_pings_notifications_and_other_ids(server, posts):
    base, _ = server
    assert await posts(f"{base}/events").send_raw_request("tools/call", {"n": 1}) == {"echo": {"n": 1}}


@pytest.mark.parametrize(("how", "code", "message"), [
    ("rpc-error", -32602, "no such tool"),
    ("fail", -32603, "HTTP 500"),
    ("redirect", -32600, "HTTP 307"),
    ("cut", -32603, "closed its event stream"),
])
async def test_errors_arrive_as_mcp_errors_naming_what_happened(server, posts, how, code, message):
    base, seen = server
    with pytest.raises(MCPError, match=message) as caught:
        await posts(f"{base}/{how}").send_raw_request("tools/call", {})
    assert caught.value.code == code
    assert len(seen) == 1, "a redirect is not followed"


def test_only_meta_that_does_not_describe_a_connection_crosses_the_gateway():
    inbound = {PROTOCOL_VERSION_META_KEY: "2026-07-28", CLIENT_INFO_META_KEY: {"name": "agent"},
               CLIENT_CAPABILITIES_META_KEY: {}, "progressToken": 7, "example.com/trace": "t"}
    assert crossing(inbound) == {"progressToken": 7, "example.com/trace": "t"}
    assert crossing({SERVER_INFO_META_KEY: {"name": "up"}, "k": 1}, SERVER_INFO_META_KEY) == {"k": 1}
    assert crossing(None) == {}


def test_fastmcp_still_has_the_result_type_for_non_object_structured_content():
    """upstream.forward relies on FastMCP's RawStructuredToolResult (not in its public __all__): an
    upstream may answer a non-object structured value, which the public ToolResult refuses."""
    content = [TextContent(type="text", text="[1, 2]")]
    with pytest.raises(ValueError, match="structured_content must be a dict"):
        ToolResult(content=content, structured_content=[1, 2])
    result = RawStructuredToolResult(content=content, structured_content=[1, 2])
    assert isinstance(result, ToolResult)
    assert result.to_mcp_result().structured_content == [1, 2]


def test_the_proxy_variables_are_honoured(monkeypatch):
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    assert env_proxy("https://mcp.example.com/mcp") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,.svc.cluster.local")
    assert env_proxy("https://mcp.example.com/mcp") == "http://proxy.internal:3128"
    assert env_proxy("http://mcp.example.com/mcp") is None, "no HTTP_PROXY set"
    assert env_proxy("https://gh.tools.svc.cluster.local/mcp") is None
    assert env_proxy("http://127.0.0.1:8080/mcp") is None
