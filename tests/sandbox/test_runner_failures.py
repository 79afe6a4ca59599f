"""The runner is honest about agent failures: real runner processes driving the scripted agent in its
failure modes (exit at once, refuse the first prompt, hang, spawn a child that ignores SIGTERM)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import pytest

from agentbox.sandbox.runner.failures import EXIT_AGENT_FAILED, EXIT_NEEDS_AUTH

from .conftest import runner_process, sse_events, wait_until

NO_GATEWAY = "http://127.0.0.1:9/mcp"  # the scripted agent reaches for it only when a turn calls a tool
SCRIPTED = json.dumps([sys.executable, "-m", "agentbox.sandbox.scripted_agent"])


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def exit_code(runner, timeout: float = 30) -> int:
    return runner.proc.process.wait(timeout)


def up(runner) -> bool:
    return httpx.get(f"{runner.base}/healthz", timeout=1).status_code == 200


async def events_until(http: httpx.AsyncClient, stop, timeout: float = 15) -> list[tuple[str, dict]]:
    """Events from the start of the stream (after the opening snapshot) until stop(kind, data) holds."""
    seen = []
    async with http.stream("GET", "/events") as stream:
        async with asyncio.timeout(timeout):
            async for kind, data in sse_events(stream):
                seen.append((kind, data))
                if stop(kind, data):
                    return seen
    return seen


# -- an agent that cannot start -------------------------------------------------------------------
async def test_an_agent_that_exits_at_once_fails_the_runner_with_its_code_and_stderr(tmp_path, processes):
    termination = tmp_path / "termination-log"
    runner = runner_process(tmp_path, NO_GATEWAY, AGENTBOX_SCRIPTED_EXIT_AT_START="4",
                            AGENTBOX_AGENT_RESTART_LIMIT="3", AGENTBOX_EXIT_DELAY_SECONDS="10",
                            AGENTBOX_TERMINATION_MESSAGE_FILE=str(termination))
    processes.append(runner.proc.start())
    wait_until(lambda: up(runner), what="runner up")
    async with httpx.AsyncClient(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
        deadline = time.monotonic() + 60  # three starts of a Python agent on a loaded machine
        while (status := (await http.get("/status")).json())["status"] != "failed":
            assert time.monotonic() < deadline, f"the runner did not give up: {status}"
            await asyncio.sleep(0.05)
        assert status["agent"] == "failed" and status["restarts"] == 3
        error = status["last_error"]
        assert error["exit_code"] == 4 and error["command"] == sys.executable
        assert error["message"] == f"agent {sys.executable} exited with code 4 during the ACP handshake"
        assert len(error["stderr"]) == 20, "the stderr tail is bounded"
        assert error["stderr"][-1] == "scripted agent: fatal: exiting at start with code 4"
        assert "gave up after 3 failed starts in a row" in status["detail"]
        unready = await http.get("/readyz")
        assert unready.status_code == 503 and unready.json()["agent"] == "failed"
        refused = await http.post("/message", json={"content": "hi"})
        assert refused.status_code == 503 and "retry-after" not in refused.headers
        assert "exited with code 4" in refused.json()["detail"]
    assert await asyncio.to_thread(exit_code, runner) == EXIT_AGENT_FAILED == 69
    message = termination.read_text()
    assert message.startswith(f"gave up after 3 failed starts in a row: agent {sys.executable} exited with "
                              "code 4 during the ACP handshake; its last stderr: ")
    assert message.endswith("scripted agent: fatal: exiting at start with code 4")
    assert "startup line 1 " not in message + " " and len(message) < 4000


async def test_a_missing_binary_is_named_while_it_is_retried_and_then_fails_the_runner(tmp_path, processes):
    termination = tmp_path / "termination-log"
    runner = runner_process(tmp_path, NO_GATEWAY, AGENTBOX_RUNTIME="custom",
                            AGENTBOX_AGENT_COMMAND='["/nonexistent/agent-binary"]',
                            AGENTBOX_AGENT_READY_WAIT_SECONDS="0.3", AGENTBOX_AGENT_RESTART_LIMIT="6",
                            AGENTBOX_AGENT_RESTART_MAX_SECONDS="0.8", AGENTBOX_EXIT_DELAY_SECONDS="0",
                            AGENTBOX_TERMINATION_MESSAGE_FILE=str(termination))
    processes.append(runner.proc.start())
    wait_until(lambda: up(runner), what="runner up")
    async with httpx.AsyncClient(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
        seen = await events_until(http, lambda kind, data: kind == "agent_error")
        assert seen[-1][1]["message"].startswith("agent /nonexistent/agent-binary cannot be started: No such "
                                                 "file or directory; restarting in ")
        retry = await http.post("/message", json={"content": "anyone there?"})
        assert retry.status_code == 503 and retry.headers["retry-after"] == "2"
        assert "it cannot be started: No such file or directory" in retry.json()["detail"]
        assert (await http.get("/readyz")).json()["agent"] == "starting"
    assert await asyncio.to_thread(exit_code, runner) == EXIT_AGENT_FAILED
    assert termination.read_text() == (
        "gave up after 6 failed starts in a row: agent /nonexistent/agent-binary cannot be started: "
        "No such file or directory")


# -- authentication -------------------------------------------------------------------------------
async def test_an_agent_refusing_the_first_prompt_needs_auth_and_a_restarted_runner_remembers(tmp_path,
                                                                                             processes):
    """claude-agent-acp opens sessions without a key and refuses the first prompt."""
    termination, remembered = tmp_path / "termination-log", tmp_path / "needs-auth"
    first_start, second_start = tmp_path / "first-agent.pid", tmp_path / "second-agent.pid"
    env = {"AGENTBOX_RUNTIME": "claude-code", "AGENTBOX_AGENT_COMMAND": SCRIPTED,
           "AGENTBOX_SCRIPTED_REFUSE_PROMPTS": "1", "AGENTBOX_EXIT_DELAY_SECONDS": "5",
           "AGENTBOX_TERMINATION_MESSAGE_FILE": str(termination), "AGENTBOX_NEEDS_AUTH_FILE": str(remembered)}
    runner = runner_process(tmp_path, NO_GATEWAY, AGENTBOX_SCRIPTED_CHILD_PID_FILE=str(first_start), **env)
    processes.append(runner.proc.start())
    wait_until(lambda: httpx.get(f"{runner.base}/readyz", timeout=1).status_code == 200, what="agent ready")
    async with httpx.AsyncClient(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
        async with http.stream("GET", "/events") as stream:
            events = sse_events(stream)
            async for kind, _ in events:
                if kind == "status_change":
                    break
            assert (await http.post("/message", json={"content": "hi"})).status_code == 200
            seen = []
            async with asyncio.timeout(10):
                async for kind, data in events:
                    seen.append((kind, data))
                    if kind == "status_change" and data["status"] != "running":
                        break
        [refusal] = [data["message"] for kind, data in seen if kind == "agent_error"]
        assert refusal.startswith("the agent requires authentication: it refused session/prompt "
                                  "(Invalid API key · Please run /login [-32000]: ")
        assert "ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN" in refusal
        assert seen[-1] == ("status_change", {"status": "needs_auth", "agent_type": "claude-code"})
        status = (await http.get("/status")).json()
        assert (status["status"], status["agent"], status["detail"]) == ("needs_auth", "needs_auth", refusal)
        unready = await http.get("/readyz")
        assert unready.status_code == 503 and unready.json() == {"agent": "needs_auth", "detail": refusal}
        again = await http.post("/message", json={"content": "hi again"})
        assert again.status_code == 503 and again.json()["detail"] == refusal
        assert "retry-after" not in again.headers
    assert await asyncio.to_thread(exit_code, runner) == EXIT_NEEDS_AUTH == 77
    assert termination.read_text() == refusal == remembered.read_text()

    # The kubelet restarts the container: the same settings would be refused again, so the runner says so
    # at once (the pod stays not Ready) without starting the agent, and stays up.
    termination.unlink()
    (tmp_path / "again").mkdir()
    restarted = runner_process(tmp_path / "again", NO_GATEWAY,
                               AGENTBOX_SCRIPTED_CHILD_PID_FILE=str(second_start), **env)
    processes.append(restarted.proc.start())
    wait_until(lambda: up(restarted), what="restarted runner up")
    async with httpx.AsyncClient(base_url=restarted.base, headers=restarted.headers(), timeout=10) as http:
        assert (await http.get("/readyz")).json() == {"agent": "needs_auth", "detail": refusal}
        assert (await http.get("/status")).json()["status"] == "needs_auth"
        await asyncio.sleep(1.5)  # past the exit delay
        assert restarted.proc.process.poll() is None, "a remembered refusal does not exit again"
    assert not second_start.exists(), "the agent was not started again"
    assert not termination.exists()


async def test_a_refusal_at_session_new_exits_with_the_needs_auth_code(tmp_path, processes):
    termination = tmp_path / "termination-log"
    runner = runner_process(tmp_path, NO_GATEWAY, AGENTBOX_SCRIPTED_REQUIRE_AUTH="1",
                            AGENTBOX_EXIT_DELAY_SECONDS="0",
                            AGENTBOX_TERMINATION_MESSAGE_FILE=str(termination))
    processes.append(runner.proc.start())
    assert await asyncio.to_thread(exit_code, runner) == EXIT_NEEDS_AUTH
    assert termination.read_text().startswith("the agent requires authentication: no auth method was chosen")


# -- the agent's process group --------------------------------------------------------------------
def test_the_agent_s_children_go_with_it_on_restart_and_on_shutdown(tmp_path, processes):
    """The scripted agent starts a child that ignores SIGTERM, as codex-acp's launcher starts its binary."""
    child_pid = tmp_path / "child.pid"
    runner = runner_process(tmp_path, NO_GATEWAY, AGENTBOX_SCRIPTED_CHILD_PID_FILE=str(child_pid),
                            AGENTBOX_AGENT_STOP_GRACE_SECONDS="0.5")
    processes.append(runner.start())
    first = int(child_pid.read_text())
    assert running(first)
    with httpx.Client(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
        assert http.post("/message", json={"content": "crash"}).status_code == 200
        wait_until(lambda: child_pid.exists() and int(child_pid.read_text()) != first, what="agent restarted")
        wait_until(lambda: http.get("/readyz").status_code == 200, what="agent ready again")
        status = http.get("/status").json()
        assert status["last_error"]["exit_code"] == 3
        assert status["last_error"]["stderr"] == ["scripted agent: crashing on purpose"]
    assert not running(first), "the crashed agent's child was stopped with it"
    second = int(child_pid.read_text())
    assert running(second)
    os.kill(runner.proc.process.pid, signal.SIGTERM)  # as the kubelet stops a container: its PID 1 alone
    assert runner.proc.process.wait(15) == 128 + signal.SIGTERM
    assert not running(second), "the runner's shutdown stopped the agent's child too"


# -- turns that do not end ------------------------------------------------------------------------
@pytest.fixture
def impatient(tmp_path, processes):
    runner = runner_process(tmp_path, NO_GATEWAY, AGENTBOX_TURN_TIMEOUT_SECONDS="2",
                            AGENTBOX_CANCEL_GRACE_SECONDS="1", AGENTBOX_AGENT_STOP_GRACE_SECONDS="0.5")
    processes.append(runner.start())
    return runner


async def turn_events(http: httpx.AsyncClient, content: str, *then: dict) -> list[tuple[str, dict]]:
    """Send `content` (and then the `then` bodies) and collect events until the status leaves running."""
    async with http.stream("GET", "/events") as stream:
        events = sse_events(stream)
        async for kind, _ in events:
            if kind == "status_change":
                break
        assert (await http.post("/message", json={"content": content})).status_code == 200
        for body in then:
            assert (await http.post("/message", json=body)).status_code == 200
        seen = []
        async with asyncio.timeout(15):
            async for kind, data in events:
                seen.append((kind, data))
                if kind == "status_change" and data["status"] != "running":
                    return seen
    return seen


async def answer(http: httpx.AsyncClient, content: str) -> str:
    await turn_events(http, content)
    return (await http.get("/messages")).json()["messages"][-1]["content"]


async def test_a_turn_past_its_time_limit_is_cancelled(impatient):
    async with httpx.AsyncClient(base_url=impatient.base, headers=impatient.headers(), timeout=10) as http:
        started = time.monotonic()
        seen = await turn_events(http, "sleep 30")
        assert 2 <= time.monotonic() - started < 5
        assert [data["message"] for kind, data in seen if kind == "agent_error"] == [
            "the turn ran past its 2s limit; cancelling it"]
        assert seen[-1][1]["status"] == "stable"
        assert (await http.get("/status")).json()["restarts"] == 0, "the agent ended the turn when asked"


async def test_a_turn_the_agent_will_not_end_is_ended_by_restarting_the_agent(impatient):
    async with httpx.AsyncClient(base_url=impatient.base, headers=impatient.headers(), timeout=10) as http:
        started = time.monotonic()
        seen = await turn_events(http, "hang")
        assert 3 <= time.monotonic() - started < 6  # the 2 s limit, then the 1 s grace
        assert [data["message"] for kind, data in seen if kind == "agent_error"] == [
            "the turn ran past its 2s limit; cancelling it",
            "the agent did not end the turn within 1s of session/cancel; restarting it"]
        await asyncio.to_thread(wait_until, lambda: httpx.get(f"{impatient.base}/readyz").status_code == 200)
        assert (await http.get("/status")).json()["restarts"] == 1
        assert await answer(http, "still there?") == "echo: still there?"


async def test_a_cancel_the_agent_ignores_ends_the_turn_all_the_same(impatient):
    async with httpx.AsyncClient(base_url=impatient.base, headers=impatient.headers(), timeout=10) as http:
        started = time.monotonic()
        seen = await turn_events(http, "hang", {"content": "\x03", "type": "raw"})
        assert time.monotonic() - started < 2.5, "ended by the cancel's grace, not the turn limit"
        assert [data["message"] for kind, data in seen if kind == "agent_error"] == [
            "the agent did not end the turn within 1s of session/cancel; restarting it"]
        await asyncio.to_thread(wait_until, lambda: httpx.get(f"{impatient.base}/readyz").status_code == 200)
        assert await answer(http, "after the cancel") == "echo: after the cancel"


async def test_a_failed_turn_keeps_the_agent_s_error_data(impatient):
    async with httpx.AsyncClient(base_url=impatient.base, headers=impatient.headers(), timeout=10) as http:
        seen = await turn_events(http, "error model overloaded")
    assert [data["message"] for kind, data in seen if kind == "agent_error"] == [
        'the turn failed: Internal error [-32603]: {"details": "model overloaded"}']
