"""The gateway over three real upstreams (streamable-http with a bearer token, sse, stdio)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest
from fastmcp import Client
from fastmcp.exceptions import ToolError
from fastmcp.telemetry import TRACE_PARENT_KEY
from mcp_types import CLIENT_INFO_META_KEY, Implementation

from .conftest import gateway_process, http_upstream, stdio_upstream_spec, wait_until

UPSTREAM_TOKEN = "upstream-token-for-gh"
CALLER_TOKEN = "caller-token-must-stay-here"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gateway")
    (tmp / "mcp-gh-token").write_text(UPSTREAM_TOKEN + "\n")
    (tmp / "mcp-gh-header-x-api-key").write_text("key-from-file")
    (tmp / "mcp-local-env-API_KEY").write_text("env-from-file\n")
    gh = http_upstream(tmp, "streamable-http", "gh", token=UPSTREAM_TOKEN).start()
    events = http_upstream(tmp, "sse", "events").start()
    config = {
        "breaker": {"failureThreshold": 2, "resetSeconds": 1},
        "upstreams": [
            {"name": "gh", "transport": "streamable-http", "url": gh.url,
             "auth": {"type": "bearer", "tokenFile": str(tmp / "mcp-gh-token")},
             "headers": [{"name": "X-Api-Key", "valueFile": str(tmp / "mcp-gh-header-x-api-key")}],
             "tools": {"deny": ["fail"]}},
            {"name": "events", "transport": "sse", "url": events.url, "timeoutSeconds": 1,
             "headers": [{"name": "X-Team", "value": "blue"}],
             "tools": {"allow": ["echo", "pid", "slow", "add"], "deny": ["add"]}},
            {**stdio_upstream_spec("local"), "env": {"MODE": "plain"},
             "envFiles": {"API_KEY": str(tmp / "mcp-local-env-API_KEY")}},
        ],
    }
    gateway = gateway_process(tmp, config).start()
    yield {"gh": gh, "events": events, "gateway": gateway}
    for item in (gateway, gh, events):
        item.proc.stop()


def gateway_client(stack, **kwargs) -> Client:
    return Client(stack["gateway"].url, **kwargs)


async def call(stack, tool: str, **arguments):
    async with gateway_client(stack) as client:
        return (await client.call_tool(tool, arguments)).data


async def test_lists_every_upstream_under_its_namespace_with_allow_and_deny(stack):
    async with gateway_client(stack) as client:
        names = {tool.name for tool in await client.list_tools()}
    assert {"gh_echo", "gh_add", "gh_pid", "gh_slow"} <= names
    assert "gh_fail" not in names  # denied
    assert {"events_echo", "events_pid", "events_slow"} <= names
    assert "events_add" not in names and "events_fail" not in names  # deny wins; not allowed
    assert {"local_echo", "local_add", "local_fail"} <= names


async def test_calls_reach_each_transport(stack):
    assert await call(stack, "gh_echo", text="hi") == "gh:hi"
    assert await call(stack, "events_echo", text="hi") == "events:hi"
    assert await call(stack, "local_add", a=2, b=3) == 5


async def test_handshake_era_clients_get_plain_json_answers(stack):
    """The agents' SDKs open a classic initialize session; the gateway answers them with JSON bodies."""
    async with gateway_client(stack, mode="legacy") as client:
        assert client.protocol_version == "2025-11-25"
        assert (await client.call_tool("gh_echo", {"text": "old"})).data == "gh:old"
    headers = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
    url = stack["gateway"].url
    async with httpx.AsyncClient(headers=headers, timeout=10) as http:
        hello = {"protocolVersion": "2025-11-25", "capabilities": {},
                 "clientInfo": {"name": "t", "version": "1"}}
        opened = await http.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "initialize",
                                            "params": hello})
        headers = {"Mcp-Session-Id": opened.headers["mcp-session-id"], "Mcp-Protocol-Version": "2025-11-25"}
        await http.post(url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        answer = await http.post(url, headers=headers, json={
            "jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "local_add",
                                                                      "arguments": {"a": 1, "b": 2}}})
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["result"]["structuredContent"] == {"result": 3}


async def test_request_meta_crosses_the_gateway_but_the_callers_connection_keys_do_not(stack):
    async with gateway_client(stack, client_info=Implementation(name="the-agent", version="9")) as client:
        parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        seen = (await client.call_tool("gh_meta", {}, meta={"example.com/key": "k-1",
                                                            TRACE_PARENT_KEY: parent})).data
    assert seen["example.com/key"] == "k-1"
    assert seen[TRACE_PARENT_KEY].split("-")[1] == parent.split("-")[1], "the trace continues"
    assert seen[CLIENT_INFO_META_KEY]["name"] == "agentbox-gateway", "the gateway's, not the agent's"


async def test_a_stdio_server_gets_its_env_and_the_values_of_its_env_files(stack):
    assert await call(stack, "local_getenv", name="MODE") == "plain"
    assert await call(stack, "local_getenv", name="API_KEY") == "env-from-file"


async def test_denied_and_unknown_tools_are_refused(stack):
    async with gateway_client(stack) as client:
        for name in ("gh_fail", "events_add", "nosuch_echo", "gh_nosuch"):
            with pytest.raises(ToolError, match="Unknown tool"):
                await client.call_tool(name, {"message": "x", "a": 1, "b": 2})
    assert stack["gateway"].readiness()["upstreams"]["gh"]["breaker"] == "closed"


async def test_the_callers_credentials_never_reach_an_upstream(stack):
    gh, events = stack["gh"], stack["events"]
    client = gateway_client(stack, auth=CALLER_TOKEN)
    client.transport.headers["X-Caller-Secret"] = "caller-header"
    async with client:
        assert (await client.call_tool("gh_echo", {"text": "a"})).data == "gh:a"
        assert (await client.call_tool("events_echo", {"text": "b"})).data == "events:b"
    for upstream in (gh, events):
        seen = upstream.seen_headers()
        assert seen, f"{upstream.transport} upstream recorded no requests"
        for headers in seen:
            assert CALLER_TOKEN not in str(headers)
            assert "x-caller-secret" not in headers
    assert all(headers.get("authorization") == f"Bearer {UPSTREAM_TOKEN}" for headers in gh.seen_headers())
    calls = [headers for headers in gh.seen_headers() if headers.get("mcp-method") == "tools/call"]
    assert calls and all("aiohttp" in headers["user-agent"] for headers in calls), \
        "streamable-HTTP tool calls take the single-POST leg (gateway/wire.py)"
    assert all(headers.get("x-api-key") == "key-from-file" for headers in gh.seen_headers())
    assert all("authorization" not in headers for headers in events.seen_headers())
    assert all(headers.get("x-team") == "blue" for headers in events.seen_headers())


async def test_an_upstream_tool_error_passes_through_without_tripping_the_breaker(stack):
    async with gateway_client(stack) as client:
        for _ in range(3):
            with pytest.raises(ToolError, match="boom"):
                await client.call_tool("local_fail", {"message": "boom"})
    status = stack["gateway"].readiness()["upstreams"]["local"]
    assert status == {**status, "connected": True, "breaker": "closed"}


async def test_a_slow_call_times_out_and_the_upstream_recovers(stack):
    started = time.monotonic()
    async with gateway_client(stack) as client:
        with pytest.raises(ToolError, match="timed out after 1s"):
            await client.call_tool("events_slow", {"seconds": 5})
    assert time.monotonic() - started < 3
    await wait_for_call(stack, "events_echo", {"text": "again"}, "events:again")


async def wait_for_call(stack, tool: str, arguments: dict, expected, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            async with gateway_client(stack) as client:
                result = (await client.call_tool(tool, arguments)).data
            if expected is None or result == expected:
                return result
        except ToolError as error:
            last = error
        await asyncio.sleep(0.2)
    raise AssertionError(f"{tool} did not recover: {last}")


async def test_a_stdio_server_that_dies_is_restarted(stack):
    first_pid = await call(stack, "local_pid")
    os.kill(first_pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        try:
            second_pid = await call(stack, "local_pid")
            if second_pid != first_pid:
                break
        except ToolError:
            pass
        assert time.monotonic() < deadline, "the stdio upstream was not restarted"
        await asyncio.sleep(0.2)
    assert await call(stack, "local_echo", text="back") == "local:back"


async def test_a_dead_upstream_fails_fast_while_the_others_keep_working(stack):
    gh, gateway = stack["gh"], stack["gateway"]
    gh.proc.kill()
    async with gateway_client(stack) as client:
        for _ in range(2):  # failureThreshold
            with pytest.raises(ToolError):
                await client.call_tool("gh_echo", {"text": "x"})
        started = time.monotonic()
        with pytest.raises(ToolError, match="unavailable"):
            await client.call_tool("gh_echo", {"text": "x"})
        assert time.monotonic() - started < 0.5, "an open breaker must fail fast"
        assert (await client.call_tool("events_echo", {"text": "ok"})).data == "events:ok"
        assert (await client.call_tool("local_echo", {"text": "ok"})).data == "local:ok"
        names = {tool.name for tool in await client.list_tools()}
        assert "local_echo" in names and "events_echo" in names
    readiness = gateway.readiness()
    assert "gh" in readiness["degraded"] and "local" in readiness["connected"]

    gh.start()  # same port, a fresh process with no memory of the old session
    await wait_for_call(stack, "gh_echo", {"text": "back"}, "gh:back")
    wait_until(lambda: "gh" in gateway.readiness()["connected"], what="gh reported connected")


async def test_metrics_count_calls_and_errors_per_upstream(stack):
    await call(stack, "local_echo", text="m")
    text = httpx.get(f"http://127.0.0.1:{stack['gateway'].port}/metrics").text
    assert 'agentbox_gateway_upstream_calls_total{upstream="local"}' in text
    assert 'agentbox_gateway_upstream_errors_total{kind="tool",upstream="local"}' in text
    assert 'agentbox_gateway_upstream_call_seconds_bucket{le="0.005",upstream="gh"}' in text
