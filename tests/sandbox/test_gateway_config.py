"""gateway.json parsing (pure) and live reload of the file by a running gateway."""

from __future__ import annotations

import json

import httpx
import pytest
from fastmcp import Client

from agentbox.sandbox.gateway.breaker import CircuitBreaker
from agentbox.sandbox.gateway.config import ConfigError, parse_config

from .conftest import gateway_process, stdio_upstream_spec, wait_until


def upstreams(*items: dict) -> str:
    return json.dumps({"upstreams": list(items)})


def test_a_full_config_parses_with_defaults():
    config = parse_config(upstreams(
        {"name": "github", "transport": "streamable-http", "url": "https://example.test/mcp",
         "auth": {"type": "bearer", "tokenFile": "/var/run/agentbox/secrets/mcp-github-token"},
         "headers": [{"name": "X-Api-Key", "value": "k"}], "tools": {"allow": ["a"], "deny": ["b"]},
         "timeoutSeconds": 5},
        {"name": "files", "transport": "stdio", "command": "npx", "args": ["-y", "x"], "env": {"K": "V"}},
    ))
    assert config.listen.port == 8765 and config.listen.host == "127.0.0.1"
    github, files = config.upstreams
    assert github.timeout_seconds == 5 and github.tools.permits("a") and not github.tools.permits("b")
    assert files.timeout_seconds == 30 and files.env == {"K": "V"}


@pytest.mark.parametrize(("upstream", "names"), [
    ({"name": "Bad_Name", "transport": "sse", "url": "http://x"}, "upstreams.0.name"),
    ({"name": "a", "transport": "websocket", "url": "http://x"}, "upstreams.0.transport"),
    ({"name": "a", "transport": "stdio"}, "needs command"),
    ({"name": "a", "transport": "sse"}, "needs an http(s) url"),
    ({"name": "a", "transport": "sse", "url": "http://x", "command": "x"}, "takes no command"),
    ({"name": "a", "transport": "sse", "url": "http://x", "auth": {"type": "bearer"}}, "needs tokenFile"),
    ({"name": "a", "transport": "sse", "url": "http://x", "headers": [{"name": "X"}]}, "exactly one of"),
    ({"name": "a", "transport": "sse", "url": "http://x",
      "headers": [{"name": "Authorization", "value": "v"}]}, "through auth"),
    ({"name": "a", "transport": "sse", "url": "http://x", "timeoutSeconds": 0}, "upstreams.0.timeoutSeconds"),
    ({"name": "a", "transport": "sse", "url": "http://x", "extra": 1}, "upstreams.0.extra"),
    ({"name": "a", "transport": "sse", "url": "http://x", "envFiles": {"K": "/f"}}, "takes no env"),
    ({"name": "a", "transport": "stdio", "command": "x", "env": {"K": "v"}, "envFiles": {"K": "/f"}},
     "both set ['K']"),
])
def test_bad_upstreams_are_refused_with_the_field_named(upstream, names):
    with pytest.raises(ConfigError, match=r"gateway\.json") as caught:
        parse_config(upstreams(upstream))
    assert names in str(caught.value)


def test_duplicate_names_and_broken_json_are_refused():
    twice = {"name": "a", "transport": "sse", "url": "http://x"}
    with pytest.raises(ConfigError, match="unique"):
        parse_config(upstreams(twice, twice))
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_config("{nope")


def test_the_breaker_opens_after_the_threshold_and_lets_one_trial_through():
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=2, reset_seconds=10, clock=lambda: now[0])
    breaker.record_failure("x")
    assert breaker.allow() and breaker.state == "closed"
    breaker.record_failure("y")
    assert breaker.state == "open" and not breaker.allow() and breaker.retry_in() == 10
    now[0] = 10
    assert breaker.state == "half-open" and breaker.allow() and not breaker.allow()
    breaker.record_failure("still down")
    assert breaker.state == "open"
    now[0] = 20
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.failures == 0


async def tool_names(url: str) -> set[str]:
    async with Client(url) as client:
        return {tool.name for tool in await client.list_tools()}


async def test_config_changes_apply_live_and_bad_files_keep_the_last_good_config(tmp_path, processes):
    gateway = gateway_process(tmp_path, {"upstreams": [stdio_upstream_spec("one")]}).start()
    processes.append(gateway)
    config = json.loads(gateway.config_path.read_text())
    assert "one_echo" in await tool_names(gateway.url)

    config["upstreams"].append({**stdio_upstream_spec("two"), "tools": {"allow": ["echo"]}})
    gateway.write_config(config)
    wait_until(lambda: "two" in gateway.readiness()["connected"], what="upstream two connected")
    assert {"one_echo", "two_echo"} <= await tool_names(gateway.url)
    assert "two_add" not in await tool_names(gateway.url)

    gateway.config_path.write_text("{ this is not json")
    wait_until(lambda: gateway.readiness()["configError"], what="the bad file reported")
    assert "not valid JSON" in gateway.readiness()["configError"]
    assert {"one_echo", "two_echo"} <= await tool_names(gateway.url)

    gateway.write_config({**config, "upstreams": [{"name": "one", "transport": "carrier-pigeon"}]})
    wait_until(lambda: "upstreams.0.transport" in (gateway.readiness()["configError"] or ""),
               what="the bad field named")
    assert {"one_echo", "two_echo"} <= await tool_names(gateway.url)

    config["upstreams"] = config["upstreams"][1:]
    gateway.write_config(config)
    wait_until(lambda: "one" not in gateway.readiness()["upstreams"], what="upstream one removed")
    assert gateway.readiness()["configError"] is None
    names = await tool_names(gateway.url)
    assert "two_echo" in names and "one_echo" not in names


async def test_a_gateway_started_with_a_broken_file_reports_it_and_recovers_when_fixed(tmp_path, processes):
    gateway = gateway_process(tmp_path, {})
    gateway.config_path.write_text('{"upstreams": 3}')
    gateway.proc.env["AGENTBOX_GATEWAY_PORT"] = str(gateway.port)
    processes.append(gateway.proc.start())
    wait_until(lambda: gateway.readiness()["configError"], what="the gateway up and reporting")
    assert httpx.get(f"http://127.0.0.1:{gateway.port}/readyz").status_code == 503
    assert "upstreams" in gateway.readiness()["configError"]
    gateway.write_config({"listen": {"port": gateway.port}, "upstreams": [stdio_upstream_spec("late")]})
    wait_until(lambda: "late" in gateway.readiness()["connected"], what="the fixed config applied")
    assert "late_echo" in await tool_names(gateway.url)
