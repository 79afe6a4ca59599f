"""Helpers for the operator's cluster tests: the operator as a real process, manifests, waiting."""

import asyncio
import contextlib
import fnmatch
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import httpx

from agentbox.crds import agentsession, mcpserver
from agentbox.operator.kube import Kube as OperatorKube
from agentbox.operator.settings import FINALIZER

# The operator under test serves only the test namespaces, so it stays out of other suites' way.
SCOPE = "t-op-*"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class OperatorProcess:
    """`python -m agentbox.operator` as a child process that tests may kill and restart."""

    def __init__(self, kubeconfig: str, log_path: str, scope: str = SCOPE, env: dict[str, str] | None = None,
                 profile: str | None = None):
        """`profile`: a path for cProfile's statistics of the operator (written when it stops)."""
        self.kubeconfig = kubeconfig
        self.profile = profile
        self.log_path = log_path
        self.scope = scope
        self.env = env or {}
        self.process: subprocess.Popen | None = None
        self.liveness_port = free_port()

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": self.kubeconfig,
            "AGENTBOX_CONFLICT_RETRY_SECONDS": "2",
            "AGENTBOX_METRICS_PORT": "0",
            # The MCP servers the tests probe listen on 127.0.0.1.
            "AGENTBOX_MCP_PROBE_ALLOW_PRIVATE_NETWORKS": "true",
            **self.env,
        }
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [
                sys.executable,
                *(["-m", "cProfile", "-o", self.profile] if self.profile else []),
                "-m",
                "agentbox.operator",
                "--standalone",
                "-n",
                self.scope,
                "--liveness",
                f"http://127.0.0.1:{self.liveness_port}/healthz",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    async def wait_alive(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient() as http:
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, (
                    f"operator died: {self.log_path}"
                )
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"http://127.0.0.1:{self.liveness_port}/healthz")).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        raise TimeoutError("operator liveness never answered")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()


def session_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    org = namespace.removeprefix("t-")
    return {
        "apiVersion": agentsession.API_VERSION,
        "kind": agentsession.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"tenant": {"org": org, "user": "ada@example.com"}, "agent": {"runtime": "scripted"}, **spec},
    }


def mcpserver_manifest(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": mcpserver.API_VERSION,
        "kind": mcpserver.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


async def session_in_phase(
    ops: OperatorKube, namespace: str, name: str, phase: str, timeout: float = 30
) -> dict[str, Any]:
    async def probe():
        body = await ops.get(agentsession.KIND, namespace, name)
        return body if body and (body.get("status") or {}).get("phase") == phase else None

    # Imported here: the operator benchmark imports this module from outside pytest (no tests/ on its path).
    from fixtures.polling import eventually

    try:
        return await eventually(probe, timeout=timeout)
    except AssertionError:
        body = await ops.get(agentsession.KIND, namespace, name)
        raise AssertionError(f"{name} never became {phase}: {(body or {}).get('status')}") from None


async def finalizers_released(kube, seconds: float = 60, scope: str = SCOPE) -> None:
    """Sessions being deleted with the last tests' namespaces carry a finalizer only the operator removes:
    stopped before it does, their namespaces would stay Terminating until an operator for `scope` runs
    again (the next run's, which then spends its first minutes on them)."""
    from fixtures.polling import eventually  # here, not at the top: see session_in_phase
    from kubernetes_asyncio import client

    async with kube.api_client() as api:
        custom = client.CustomObjectsApi(api)

        async def released() -> bool:
            listing = await custom.list_cluster_custom_object(agentsession.GROUP, agentsession.VERSION,
                                                              agentsession.PLURAL)
            return not any(fnmatch.fnmatch(item["metadata"]["namespace"], scope)  # this operator's only
                           and item["metadata"].get("deletionTimestamp")
                           and FINALIZER in (item["metadata"].get("finalizers") or [])
                           for item in listing["items"])

        await eventually(released, timeout=seconds, what="the operator to release deleted sessions")
