"""The running system for end-to-end tests: the operator, the API and the session stand-ins as processes.

Each runs as `make dev` runs it: the operator and the API under the Helm chart's ServiceAccounts (token
kubeconfigs from hack/chart_identity.py), the API reaching session runners through the Kubernetes API's
port-forward. On kwok, session pods are stood in for by hack/session_runners.py (kwok forwards their port
to the local runner); on kind (AGENTBOX_CLUSTER_KIND=kind) they are real. Only the scope differs from
`make dev`: the operator serves the e2e tenant namespaces alone, so other suites sharing the cluster keep
their own operators.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import chart_identity  # from hack/ (see __init__.py)
import httpx
import mint_token
from fixtures.cluster import Kube, cache_dir, read_versions

REPO = Path(__file__).resolve().parents[2]

ISSUER = "https://auth.agentbox.localhost/auth/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tools_for(kube: Kube) -> chart_identity.Tools:
    versions = read_versions()
    return chart_identity.Tools(kubectl=kube.kubectl_path, kubeconfig=kube.kubeconfig,
                                helm=cache_dir() / "bin" / f"helm-{versions['HELM_VERSION']}" / "helm")


@dataclass
class Process:
    """A child process with its output in a log file; stopped with SIGTERM, then SIGKILL."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        output = await asyncio.to_thread(open, self.log, "ab")
        with output:
            self.process = await asyncio.create_subprocess_exec(
                *self.argv, env={**os.environ, **self.env}, cwd=REPO, stdin=asyncio.subprocess.DEVNULL,
                stdout=output, stderr=asyncio.subprocess.STDOUT)

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self) -> None:
        if not self.alive():
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    async def wait_for(self, probe: Callable[[], Any], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"{self.name} exited; its log: {self.log}\n{self.tail()}")
            if await probe():
                return
            await asyncio.sleep(0.2)
        raise AssertionError(f"{self.name} not ready in {timeout}s; its log: {self.log}\n{self.tail()}")

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""


async def http_ok(url: str) -> bool:
    async with httpx.AsyncClient(timeout=2) as http:
        with contextlib.suppress(httpx.HTTPError):
            return (await http.get(url)).status_code == 200
    return False


@contextlib.asynccontextmanager
async def operator_process(kubeconfig: Path, scope: str, log: Path,
                           chart_env: dict[str, str] | None = None) -> AsyncIterator[Process]:
    """The operator as the chart runs it (`chart_env`: its container's environment, from
    chart_identity.render_operator), but standalone and limited to `scope` (a namespace glob)."""
    liveness = free_port()
    process = Process("operator", [sys.executable, "-m", "agentbox.operator", "--standalone", "-n", scope,
                                   "--liveness", f"http://127.0.0.1:{liveness}/healthz"],
                      {**(chart_env or {}), "KUBECONFIG": str(kubeconfig), "AGENTBOX_METRICS_PORT": "0",
                       "AGENTBOX_EXPIRY_CHECK_SECONDS": "1", "AGENTBOX_CONFLICT_RETRY_SECONDS": "2",
                       # the journey's MCP upstream listens on loopback
                       "AGENTBOX_MCP_PROBE_ALLOW_PRIVATE_NETWORKS": "true"}, log)
    try:
        await process.start()
        await process.wait_for(lambda: http_ok(f"http://127.0.0.1:{liveness}/healthz"))
        yield process
    finally:
        await process.stop()


@dataclass
class Stack:
    api_url: str
    hs256_secret: str
    kube: Kube
    processes: list[Process] = field(default_factory=list)
    orgs: list[str] = field(default_factory=list)  # onboarded by the tests, removed after them

    def token(self, *, sub: str = "platform", org: str | None = None, role: str | None = None,
              service_role: bool = False, secret: str | None = None) -> str:
        return mint_token.mint(secret or self.hs256_secret, issuer=ISSUER, audience="authenticated", sub=sub,
                               org=org, role=role, service_role=service_role, ttl_seconds=600)

    def bearer(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log})\n{p.tail()}" for p in self.processes)


@contextlib.asynccontextmanager
async def running_stack(kube: Kube, app_dsn: str, workdir: Path, *, release: str, system_namespace: str,
                        scope: str, tenant_prefix: str) -> AsyncIterator[Stack]:
    """Operator, session stand-ins and API, each under the chart's identity where the chart has one."""
    tools = tools_for(kube)
    identities = await chart_identity.write_identities(tools, release, system_namespace, workdir / "identity",
                                                       duration="1h")
    chart_operator = await chart_identity.render_operator(tools, release, system_namespace)
    stack = Stack(api_url="", hs256_secret=secrets.token_urlsafe(48), kube=kube)
    async with operator_process(identities["operator"], scope, workdir / "operator.log",
                                chart_operator.env) as operator:
        stack.processes.append(operator)
        async with _runners_and_api(stack, kube, identities, app_dsn, workdir, tenant_prefix):
            yield stack


@contextlib.asynccontextmanager
async def _runners_and_api(stack: Stack, kube: Kube, identities: dict[str, Path], app_dsn: str, workdir: Path,
                           tenant_prefix: str) -> AsyncIterator[None]:
    try:
        if os.environ.get("AGENTBOX_CLUSTER_KIND", "kwok") == "kwok":  # kind runs the pods for real
            ready_file = workdir / "runners.ready"
            runners = Process("session-runners", [
                sys.executable, str(REPO / "hack" / "session_runners.py"),
                "--kubeconfig", str(kube.kubeconfig), "--state-dir", str(workdir / "pods"),
                "--ready-file", str(ready_file), "--namespace-prefix", tenant_prefix],
                {}, workdir / "session-runners.log")
            stack.processes.append(runners)
            await runners.start()
            await runners.wait_for(lambda: asyncio.to_thread(ready_file.exists))

        port = free_port()
        api = Process("api", [sys.executable, "-m", "agentbox.api"], {
            "KUBECONFIG": str(identities["api"]), "AGENTBOX_PORT": str(port),
            "AGENTBOX_DATABASE_URL": app_dsn,
            "AGENTBOX_JWT_ISSUER": ISSUER, "AGENTBOX_JWT_HS256_SECRET": stack.hs256_secret,
            "AGENTBOX_ENCRYPTION_KEYS": "e2e1:" + base64.b64encode(os.urandom(32)).decode(),
            "AGENTBOX_RUNNER_TRANSPORT": "port-forward",
            "AGENTBOX_MCP_TEST_TIMEOUT_SECONDS": "5"}, workdir / "api.log")
        stack.processes.append(api)
        await api.start()
        stack.api_url = f"http://127.0.0.1:{port}"
        await api.wait_for(lambda: http_ok(f"{stack.api_url}/readyz"))
        yield
    finally:
        for process in reversed(stack.processes[1:]):  # the operator stops with its own block
            await process.stop()


async def delete_tenant(kube: Kube, namespace: str) -> None:
    """Delete a tenant namespace whose operator still runs: first the objects carrying its finalizers
    (it releases them in seconds), then the namespace, left to the controller-manager."""
    await kube.kubectl("delete", "agentsessions,mcpservers", "--all", "-n", namespace, "--ignore-not-found",
                       "--timeout=90s")
    await kube.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false")
