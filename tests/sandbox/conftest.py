"""Real processes for the sandbox tests: upstream MCP servers, the gateway, the runner."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent
UPSTREAM_SCRIPT = str(HERE / "upstream_server.py")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # not up yet
            last = error
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what} (last error: {last})")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Proc:
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen | None = None

    def start(self) -> Proc:
        self.process = subprocess.Popen(self.args, env={**os.environ, **self.env}, start_new_session=True)
        return self

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def kill(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class HttpUpstream:
    transport: str
    port: int
    token: str | None
    record: Path
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{'mcp' if self.transport == 'streamable-http' else 'sse'}"

    def start(self) -> HttpUpstream:
        self.proc.start()
        wait_until(lambda: port_open(self.port), what=f"{self.transport} upstream on {self.port}")
        return self

    def seen_headers(self) -> list[dict[str, str]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


def http_upstream(tmp: Path, transport: str, label: str, token: str | None = None) -> HttpUpstream:
    port = free_port()
    record = tmp / f"{label}-headers.jsonl"
    args = [sys.executable, UPSTREAM_SCRIPT, "--transport", transport, "--port", str(port), "--label", label,
            "--record", str(record)]
    if token:
        args += ["--token", token]
    return HttpUpstream(transport, port, token, record, Proc(args))


@dataclass
class GatewayProc:
    config_path: Path
    port: int
    proc: Proc

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/mcp"

    def write_config(self, config: dict) -> None:
        # Write-then-rename, as the kubelet swaps a ConfigMap, so the gateway never reads half a file.
        staging = self.config_path.with_suffix(".tmp")
        staging.write_text(json.dumps(config))
        staging.replace(self.config_path)

    def readiness(self) -> dict:
        return httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=2).json()

    def start(self) -> GatewayProc:
        self.proc.start()
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{self.port}/readyz", timeout=1).status_code == 200,
                   what="gateway ready")
        return self


def gateway_process(tmp: Path, config: dict) -> GatewayProc:
    port = free_port()
    config = {**config, "listen": {"host": "127.0.0.1", "port": port}}
    path = tmp / "gateway.json"
    gateway = GatewayProc(path, port, Proc([sys.executable, "-m", "agentbox.sandbox.gateway"], {
        "AGENTBOX_GATEWAY_CONFIG": str(path),
        "AGENTBOX_GATEWAY_POLL_SECONDS": "0.2",
        "AGENTBOX_GATEWAY_HEALTH_SECONDS": "0.3",
        "AGENTBOX_LOG_LEVEL": "WARNING",
    }))
    gateway.write_config(config)
    return gateway


def stdio_upstream_spec(label: str = "local") -> dict:
    return {"name": label, "transport": "stdio", "command": sys.executable,
            "args": [UPSTREAM_SCRIPT, "--transport", "stdio", "--label", label]}


@pytest.fixture
def processes() -> Iterator[list]:
    """Everything started through this list is stopped when the test ends, whatever happens."""
    started: list = []
    yield started
    for item in reversed(started):
        (item.proc if hasattr(item, "proc") else item).stop()


@dataclass
class RunnerProc:
    port: int
    token: str
    workspace: Path
    proc: Proc

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def start(self) -> RunnerProc:
        self.proc.start()
        wait_until(lambda: httpx.get(f"{self.base}/healthz", timeout=1).json()["agent"] == "ready",
                   what="runner and agent ready")
        return self


def runner_process(tmp: Path, gateway_url: str, **env: str) -> RunnerProc:
    port = free_port()
    workspace = tmp / "workspace"
    workspace.mkdir()
    (tmp / "runner-token").write_text("runner-token-value\n")
    (tmp / "system-prompt.md").write_text("You are a careful test agent.")
    return RunnerProc(port, "runner-token-value", workspace, Proc(
        [sys.executable, "-m", "agentbox.sandbox.runner"],
        {"AGENTBOX_RUNTIME": "scripted", "AGENTBOX_RUNNER_TOKEN_FILE": str(tmp / "runner-token"),
         "AGENTBOX_SYSTEM_PROMPT_FILE": str(tmp / "system-prompt.md"), "AGENTBOX_GATEWAY_URL": gateway_url,
         "AGENTBOX_WORKSPACE": str(workspace), "AGENTBOX_RUNNER_PORT": str(port),
         "AGENTBOX_AGENT_RESTART_MAX_SECONDS": "1", "AGENTBOX_LOG_LEVEL": "WARNING", **env}))


async def sse_events(response: httpx.Response):
    """Parse a server-sent event stream into (event, data) pairs."""
    kind, data = "message", []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
        elif line.startswith("event:"):
            kind = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
