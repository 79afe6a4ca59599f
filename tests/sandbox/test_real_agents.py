"""The real ACP agents the images pin (sandbox/images/agents.json), installed by hack/agents.sh (`make
agents`), run with no credentials and no network: each in a network namespace of its own with only a
loopback device that is down, so nothing they try leaves the machine, and their refusal cannot be a
network failure in disguise. Their `initialize` answers must fit what the runner expects of them
(auth.DEFAULT_AUTH_METHODS), and the runner must end up reporting needs_auth for each: not ready, not
restarting it, exiting 77 with its reason."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from acp import PROTOCOL_VERSION, Client, RequestError, connect_to_agent
from acp.schema import ClientCapabilities, FileSystemCapabilities, HttpMcpServer, Implementation

from agentbox.sandbox.runner.auth import DEFAULT_AUTH_METHODS, SELF_READ_CREDENTIALS
from agentbox.sandbox.runner.commands import DEFAULT_COMMANDS
from agentbox.sandbox.runner.failures import EXIT_NEEDS_AUTH

from .conftest import runner_process, wait_until

pytestmark = pytest.mark.agents

REPO = Path(__file__).resolve().parents[2]
PINS = json.loads((REPO / "sandbox/images/agents.json").read_text())
RUNTIMES = sorted(PINS["agents"])
# Whatever the machine's environment holds for these, the agents must not see it.
CREDENTIALS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "CLAUDE_CODE_OAUTH_TOKEN", "OPENAI_API_KEY",
               "CODEX_API_KEY", "CODEX_HOME", "GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_CLOUD_PROJECT",
               "GOOGLE_CLOUD_LOCATION", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_GENAI_USE_VERTEXAI",
               "CODEX_CONFIG", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_STATE_HOME", "XDG_CACHE_HOME")
# No network at all: a new network namespace, owned by a new user namespace (so no privilege is needed) in
# which the agent is uid 65532, as in a session pod (claude-agent-acp refuses some things to root).
OFFLINE = ["unshare", "--map-user=65532", "--map-group=65532", "--net", "--"]


def installed_paths() -> dict[str, Path]:
    """Node.js and each runtime's bin directory, as hack/agents.sh lays them out."""
    lines = subprocess.run([str(REPO / "hack/agents.sh"), "path"], capture_output=True, text=True,
                           check=True).stdout.split()
    return dict(zip(["node", *PINS["agents"]], map(Path, lines), strict=True))


def offline_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        [*OFFLINE, "true"], capture_output=True).returncode == 0


def test_offline_reaches_not_even_this_machine():
    if not offline_works():
        pytest.skip("`unshare --map-user --net` does not work here")
    with socket.create_server(("127.0.0.1", 0)) as listening:
        port = listening.getsockname()[1]
        reach = subprocess.run([*OFFLINE, sys.executable, "-c", "import socket, sys; "
                                f"socket.create_connection(('127.0.0.1', {port}), timeout=2)"],
                               capture_output=True, text=True)
    assert reach.returncode != 0 and "Network is unreachable" in reach.stderr, reach.stderr


@pytest.fixture(scope="module")
def paths() -> dict[str, Path]:
    if not offline_works():
        pytest.skip("the agents run without network in namespaces of their own, and `unshare "
                    "--map-user --net` does not work here (util-linux 2.38 or later, user namespaces)")
    found = installed_paths()
    missing = [name for name, path in found.items() if not path.is_dir()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: run `make agents` (hack/agents.sh installs the "
                    "versions pinned in sandbox/images/agents.json from the npm registry)")
    return found


@pytest.fixture
def agent_environ(paths, tmp_path, monkeypatch):
    """The environment of a pod's runner, less the credentials: PATH with the pinned Node.js first, a
    HOME of its own (nothing from this machine's ~/.claude, ~/.codex or ~/.gemini)."""
    for name in CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))

    def for_runtime(runtime: str) -> dict[str, str]:
        path = os.pathsep.join([str(paths["node"]), str(paths[runtime]), os.environ["PATH"]])
        monkeypatch.setenv("PATH", path)
        return {"PATH": path, "HOME": str(home)}
    return for_runtime


class SilentClient(Client):
    async def session_update(self, session_id, update, **kwargs):
        return None

    async def request_permission(self, *args, **kwargs):
        raise RequestError.method_not_found("session/request_permission")


@pytest.mark.parametrize("runtime", RUNTIMES)
async def test_the_pinned_agent_answers_initialize_as_the_runner_expects(runtime, agent_environ, tmp_path):
    env = agent_environ(runtime)
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    agent = await asyncio.create_subprocess_exec(
        *OFFLINE, *DEFAULT_COMMANDS[runtime], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        env=env, cwd=workspace, start_new_session=True, limit=16 * 1024 * 1024)
    try:
        conn = connect_to_agent(SilentClient(), agent.stdin, agent.stdout)
        async with asyncio.timeout(60):
            answer = await conn.initialize(
                protocol_version=PROTOCOL_VERSION,
                client_capabilities=ClientCapabilities(
                    fs=FileSystemCapabilities(read_text_file=True, write_text_file=True)),
                client_info=Implementation(name="agentbox-runner", version="0.1.0"))
            refusal = None
            if runtime not in SELF_READ_CREDENTIALS:  # these open sessions and refuse the first prompt
                with pytest.raises(RequestError) as refused:
                    gateway = HttpMcpServer(type="http", name="agentbox", url="http://127.0.0.1:9/mcp",
                                            headers=[])
                    await conn.new_session(cwd=str(workspace), mcp_servers=[gateway])
                refusal = refused.value
    finally:
        os.killpg(agent.pid, 9)
        await agent.wait()

    assert answer.protocol_version == PROTOCOL_VERSION
    assert answer.agent_info is not None and answer.agent_info.version == PINS["agents"][runtime]["version"]
    capabilities = answer.agent_capabilities
    assert capabilities is not None and capabilities.mcp_capabilities is not None
    assert capabilities.mcp_capabilities.http, "the runner gives the agent its gateway over streamable HTTP"
    advertised = [method.id for method in answer.auth_methods or []]
    if runtime in SELF_READ_CREDENTIALS:
        assert advertised == [], "its logins need a terminal; it reads its credentials by itself"
    else:
        defaults = {method_id for method_id, _ in DEFAULT_AUTH_METHODS[runtime]}
        assert defaults <= set(advertised), f"the runner's defaults for {runtime} are not advertised"
        assert refusal is not None and refusal.code == -32000, "no credentials: auth-required"


def expected_refusal(runtime: str) -> list[str]:
    if runtime in SELF_READ_CREDENTIALS:
        return ["it refused session/prompt", " or ".join(SELF_READ_CREDENTIALS[runtime])]
    return ["no auth method was chosen",
            *(f"{method_id} reads" for method_id, _ in DEFAULT_AUTH_METHODS[runtime])]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_the_runner_reports_needs_auth_for_the_pinned_agent(runtime, agent_environ, tmp_path, processes):
    agent_environ(runtime)
    runner = runner_process(
        tmp_path, "http://127.0.0.1:9/mcp", AGENTBOX_RUNTIME=runtime, AGENTBOX_AGENT_MODEL="some-model",
        # The runtime's own command, run offline; the runtime still decides the model, prompt and auth.
        AGENTBOX_AGENT_COMMAND=json.dumps([*OFFLINE, *DEFAULT_COMMANDS[runtime]]),
        AGENTBOX_EXIT_DELAY_SECONDS="3", AGENTBOX_NEEDS_AUTH_FILE=str(tmp_path / "needs-auth"),
        AGENTBOX_TERMINATION_MESSAGE_FILE=str(tmp_path / "termination-log"))
    processes.append(runner.proc.start())
    health = f"{runner.base}/healthz"
    if runtime in SELF_READ_CREDENTIALS:  # it opens its session and refuses the first prompt
        wait_until(lambda: httpx.get(health, timeout=1).json()["agent"] == "ready", timeout=90,
                   what=f"{runtime} ready")
        sent = httpx.post(f"{runner.base}/message", json={"content": "hello", "type": "user"},
                          headers=runner.headers(), timeout=90)
        assert sent.status_code == 200, sent.text
    wait_until(lambda: httpx.get(health, timeout=1).json()["agent"] == "needs_auth", timeout=90,
               what=f"{runtime} needs_auth")
    status = httpx.get(f"{runner.base}/status", headers=runner.headers(), timeout=2).json()
    assert status["status"] == "needs_auth" and status["restarts"] == 0, status
    assert httpx.get(f"{runner.base}/readyz", timeout=2).status_code == 503
    for part in expected_refusal(runtime):
        assert part in status["detail"], status["detail"]

    assert runner.proc.process.wait(30) == EXIT_NEEDS_AUTH
    assert (tmp_path / "termination-log").read_text() == status["detail"]
    assert (tmp_path / "needs-auth").read_text() == status["detail"]

