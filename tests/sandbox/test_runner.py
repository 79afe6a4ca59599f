"""The runner with the scripted agent, over a real gateway and upstream: runner -> agent -> gateway -> MCP."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time

import httpx
import pytest

from .conftest import gateway_process, runner_process, sse_events, stdio_upstream_spec, wait_until


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runner")
    gateway = gateway_process(tmp, {"upstreams": [stdio_upstream_spec("local")]}).start()
    runner = runner_process(tmp, gateway.url, AGENTBOX_UPLOAD_MAX_BYTES="2048").start()
    yield runner
    runner.proc.stop()
    gateway.proc.stop()


@pytest.fixture
async def http(runner):
    async with httpx.AsyncClient(base_url=runner.base, headers=runner.headers(), timeout=10) as client:
        yield client


async def wait_stable(http: httpx.AsyncClient, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (await http.get("/status")).json()["status"] != "stable":
        assert time.monotonic() < deadline, "the agent did not become stable"
        await asyncio.sleep(0.05)


async def turn(http: httpx.AsyncClient, content: str, until: str = "status_change") -> list[tuple[str, dict]]:
    """Send one message and collect the events of its turn, up to the status going back to stable."""
    seen: list[tuple[str, dict]] = []
    async with http.stream("GET", "/events") as stream:
        events = sse_events(stream)
        # The stream opens with the current state; it ends with the status.
        async for kind, _ in events:
            if kind == "status_change":
                break
        assert (await http.post("/message", json={"content": content})).status_code == 200
        async with asyncio.timeout(15):
            async for kind, data in events:
                seen.append((kind, data))
                if kind == until and (kind != "status_change" or data["status"] == "stable"):
                    break
    return seen


async def test_every_call_but_the_probes_needs_the_runner_token(runner):
    async with httpx.AsyncClient(base_url=runner.base, timeout=5) as anonymous:
        assert (await anonymous.get("/healthz")).status_code == 200
        assert (await anonymous.get("/readyz")).json() == {"agent": "ready"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": runner.token},
                        {"Authorization": f"Basic {runner.token}"}):
            for method, path in (("GET", "/status"), ("GET", "/messages"), ("POST", "/message"),
                                 ("GET", "/events"), ("POST", "/upload")):
                response = await anonymous.request(method, path, headers=headers, json={"content": "x"})
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"


async def test_a_message_streams_events_and_lands_in_the_history(http):
    events = await turn(http, "hello there")
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "status_change" and events[0][1]["status"] == "running"
    updates = [(d.get("role"), d.get("message")) for k, d in events if k == "message_update"]
    assert ("user", "hello there") in updates and ("agent", "echo: hello there") in updates
    assert events[-1] == ("status_change", {"status": "stable", "agent_type": "scripted"})
    history = (await http.get("/messages")).json()["messages"]
    assert [(m["role"], m["content"]) for m in history[-2:]] == [("user", "hello there"),
                                                                 ("agent", "echo: hello there")]
    status = (await http.get("/status")).json()
    assert status["status"] == "stable" and status["agent_type"] == "scripted"
    assert status["last_activity"].endswith("Z")


async def test_a_message_while_running_gets_409_and_a_raw_ctrl_c_cancels(http):
    assert (await http.post("/message", json={"content": "sleep 20"})).status_code == 200
    busy = await http.post("/message", json={"content": "too soon"})
    assert busy.status_code == 409 and "running" in busy.json()["detail"]
    started = time.monotonic()
    assert (await http.post("/message", json={"content": "\x03", "type": "raw"})).status_code == 200
    await wait_stable(http)
    assert time.monotonic() - started < 5


async def test_bad_message_bodies_name_the_field(http):
    response = await http.post("/message", json={"content": "x", "type": "shout"})
    assert response.status_code == 422 and "type" in str(response.json())
    response = await http.post("/message", json={"type": "user"})
    assert response.status_code == 422 and "content" in str(response.json())


async def test_a_tool_call_goes_through_the_gateway_into_the_upstream(http):
    events = await turn(http, 'tool local_echo {"text": "via-the-chain"}')
    agent_updates = [data for kind, data in events if kind == "message_update" and data["role"] == "agent"]
    assert agent_updates[-1]["message"] == "local:via-the-chain"
    reply = (await http.get("/messages")).json()["messages"][-1]
    assert reply["tool_calls"] == [{"id": "call-1", "title": "MCP local_echo", "status": "completed"}]


async def test_the_agent_works_in_the_workspace_with_the_system_prompt(http, runner):
    await turn(http, "write notes/plan.txt step one")
    assert (runner.workspace / "notes" / "plan.txt").read_text() == "step one"
    await turn(http, "system-prompt")
    assert (await http.get("/messages")).json()["messages"][-1]["content"] == "You are a careful test agent."
    await turn(http, "ask deploy to prod")
    assert (await http.get("/messages")).json()["messages"][-1]["content"] == "permission: allow"


async def test_uploads_land_in_the_workspace_and_escapes_and_oversize_are_refused(http, runner):
    ok = await http.post("/upload", files={"file": ("data.csv", b"a,b\n1,2\n")}, data={"path": "in/data.csv"})
    assert ok.status_code == 200, ok.text
    assert (runner.workspace / "in" / "data.csv").read_bytes() == b"a,b\n1,2\n"
    named = await http.post("/upload", files={"file": ("plain.txt", b"x")})
    assert named.status_code == 200 and (runner.workspace / "plain.txt").exists()
    for path in ("../escape.txt", "/etc/passwd-copy", "in/../../escape.txt"):
        refused = await http.post("/upload", files={"file": ("f", b"x")}, data={"path": path})
        assert refused.status_code == 400 and refused.json()["detail"].startswith("path:"), path
    assert not (runner.workspace.parent / "escape.txt").exists()
    (runner.workspace / "link").symlink_to(runner.workspace.parent)
    refused = await http.post("/upload", files={"file": ("f", b"x")}, data={"path": "link/escape.txt"})
    assert refused.status_code == 400
    big = await http.post("/upload", files={"file": ("big.bin", b"x" * 5000)}, data={"path": "big.bin"})
    assert big.status_code == 413 and big.json()["detail"].startswith("file:")
    assert not (runner.workspace / "big.bin").exists()
    assert not [p for p in runner.workspace.rglob(".upload-*")], "a refused upload left a staging file"


async def test_the_agent_crashing_mid_turn_is_reported_and_it_is_restarted(http, runner):
    events = await turn(http, "crash", until="agent_error")
    assert any(kind == "agent_error" and "exited with code 3" in data["message"] for kind, data in events)
    await wait_stable(http)
    wait_until(lambda: httpx.get(f"{runner.base}/healthz").json()["agent"] == "ready", what="agent restarted")
    events = await turn(http, "after the crash")
    assert ("agent", "echo: after the crash") in [(d.get("role"), d.get("message")) for _, d in events]


def test_a_gemini_session_reads_its_prompt_from_a_private_home_removed_when_the_runner_stops(tmp_path):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    # The scripted agent stands in for Gemini CLI; the runtime still decides where the prompt goes.
    scripted = json.dumps([sys.executable, "-m", "agentbox.sandbox.scripted_agent"])
    runner = runner_process(tmp_path, "http://127.0.0.1:9/mcp", AGENTBOX_RUNTIME="gemini",
                            AGENTBOX_AGENT_COMMAND=scripted, TMPDIR=str(scratch)).start()
    try:
        [context] = scratch.glob("agentbox-runner-*/gemini/.gemini/GEMINI.md")
        assert context.read_text() == "You are a careful test agent."
        assert not list(runner.workspace.iterdir()), "nothing written into the workspace"
    finally:
        runner.proc.stop()
    assert runner.proc.process.returncode == 128 + signal.SIGTERM
    assert not list(scratch.iterdir()), "the private directory goes with the runner"


async def test_a_pool_members_runner_waits_for_its_claim_then_serves_the_sessions_token(tmp_path):
    """A pool member's runner holds a pool token: it starts nothing until the claim writes the session's
    token, then reads the system prompt written with it, and the pool token opens nothing."""
    gateway = gateway_process(tmp_path, {"upstreams": [stdio_upstream_spec("local")]}).start()
    runner = runner_process(tmp_path, gateway.url)
    token_file, prompt_file = tmp_path / "runner-token", tmp_path / "system-prompt.md"
    token_file.write_text("pool-placeholder\n")
    prompt_file.write_text("")
    runner.proc.start()
    try:
        await asyncio.sleep(1.0)
        async with httpx.AsyncClient(base_url=runner.base, timeout=2) as anonymous:
            with pytest.raises(httpx.ConnectError):
                await anonymous.get("/healthz")
        prompt_file.write_text("You serve the tenant who claimed you.")
        token_file.write_text("runner-token-value\n")
        wait_until(lambda: httpx.get(f"{runner.base}/healthz", timeout=1).json()["agent"] == "ready",
                   what="the claimed runner and its agent")
        async with httpx.AsyncClient(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
            await wait_stable(http)
            await turn(http, "system-prompt")
            answer = (await http.get("/messages")).json()["messages"][-1]["content"]
            assert answer == "You serve the tenant who claimed you."
        async with httpx.AsyncClient(base_url=runner.base, timeout=5) as stale:
            refused = await stale.get("/status", headers={"Authorization": "Bearer pool-placeholder"})
            assert refused.status_code == 401
    finally:
        runner.proc.stop()
        gateway.proc.stop()
