"""Local stand-ins for session pods on a cluster whose nodes run no containers (kwok).

    python hack/session_runners.py --kubeconfig ADMIN --state-dir DIR [--ready-file F] [--namespace-prefix P]

For every live session pod the operator made (label app.kubernetes.io/managed-by=agentbox) it starts
what the pod would run, `python -m agentbox.sandbox.gateway` and, once it listens, `python -m
agentbox.sandbox.runner`, fed from the session's own ConfigMap and Secret (runner token, system prompt,
gateway.json, MCP credentials) and the runner container's environment, each on a free loopback port.
A kwok PortForward resource named after the pod (owned by it, so it goes with it) points the runner's
container port at a local relay that hands each connection to the runner once it listens (as a real pod
is not ready before its runner): the API reaches it as it reaches a real pod,
`AGENTBOX_RUNNER_TRANSPORT=port-forward` through the Kubernetes API. When the pod goes (suspend, delete),
its processes stop.

As a kubelet would, when a stand-in's runner exits (it gives up on its agent: 69, or 77 for an agent that
needs authentication) its exit code and termination message go into the pod's status as the runner
container's last state, not ready, and the stand-in starts again; the pod reads ready again once the new
runner's /readyz does. The runner's termination message file and its remembered auth refusal (on the
pod's /tmp emptyDir in a real pod) live in DIR too, the latter per pod uid.

--ready-file is written once the first pass over the pods is done. Logs go to DIR/<namespace>/<pod>/.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("session-runners")

POD_SELECTOR = "app.kubernetes.io/managed-by=agentbox,agentbox.dev/session"
SESSION_LABEL = "agentbox.dev/session"
IN_POD_SECRETS = "/var/run/agentbox/secrets/"  # where the pod mounts the session's Secret
POLL_SECONDS = 0.5
# How long a stand-in process may take to listen (the gateway, then the runner: each start takes seconds).
STARTUP_GRACE_SECONDS = 30.0
LIVE_PHASES = ("Pending", "Running")
KWOK_GROUP, KWOK_VERSION, PORT_FORWARDS = "kwok.x-k8s.io", "v1alpha1", "portforwards"
RUNNER_CONTAINER = "runner"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def copy(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65_536):
            target.write(data)
            await target.drain()
    finally:
        target.close()


async def connect_when_listening(port: int, keep_trying: Callable[[], bool],
                                 ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A connection to the loopback port once something listens there; None if keep_trying() turns
    false or STARTUP_GRACE_SECONDS pass first."""
    deadline = asyncio.get_running_loop().time() + STARTUP_GRACE_SECONDS
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if not keep_trying() or asyncio.get_running_loop().time() > deadline:
                return None
            await asyncio.sleep(0.1)


def runner_exited(status: dict, exit_code: int, message: str, when: str) -> dict:
    """The pod status patch a kubelet makes when the runner container exits and is started again: the exit
    is its last state, and neither it nor the pod is ready (a status as the API serialises it)."""
    containers = []
    for container in status.get("containerStatuses") or []:
        if container["name"] == RUNNER_CONTAINER:
            running = (container.get("state") or {}).get("running") or {}
            ended = {"exitCode": exit_code, "reason": "Error" if exit_code else "Completed",
                     "startedAt": running.get("startedAt", when), "finishedAt": when,
                     **({"message": message} if message else {})}
            container = {**container, "ready": False, "started": True,
                         "restartCount": container.get("restartCount", 0) + 1,
                         "state": {"running": {"startedAt": when}}, "lastState": {"terminated": ended}}
        containers.append(container)
    return {"containerStatuses": containers, "conditions": _readiness(status, ready=False)}


def runner_ready_again(status: dict) -> dict:
    """The pod status patch once the restarted runner is ready again."""
    containers = [{**container, "ready": True} if container["name"] == RUNNER_CONTAINER else container
                  for container in status.get("containerStatuses") or []]
    return {"containerStatuses": containers, "conditions": _readiness(status, ready=True)}


def _readiness(status: dict, ready: bool) -> list[dict]:
    conditions = []
    for condition in status.get("conditions") or []:
        if condition["type"] in ("Ready", "ContainersReady"):
            condition = {"type": condition["type"], "status": "True" if ready else "False",
                         "lastTransitionTime": condition.get("lastTransitionTime")}
        conditions.append(condition)
    return conditions


@dataclass
class StandIn:
    """The processes standing in for one pod, and the relay kwok forwards the pod's port to."""

    namespace: str
    session: str
    pod_uid: str
    runner_port: int
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    relay: asyncio.Server | None = None
    runner_start: asyncio.Task | None = None  # the runner starts once the gateway listens
    runner: asyncio.subprocess.Process | None = None
    termination_log: Path | None = None
    readiness: asyncio.Task | None = None  # after a runner's exit: marks the pod ready once it is again

    def runner_exit(self) -> tuple[int, str] | None:
        """The runner's exit code and termination message, once it has exited."""
        if self.runner is None or self.runner.returncode is None:
            return None
        message = ""
        if self.termination_log is not None and self.termination_log.exists():
            message = self.termination_log.read_text()
        return self.runner.returncode, message

    @property
    def runner_url(self) -> str:
        return f"http://127.0.0.1:{self.runner_port}"

    def alive(self) -> bool:
        start_failed = self.runner_start is not None and self.runner_start.done() and (
            self.runner_start.cancelled() or self.runner_start.exception() is not None)
        return not start_failed and all(process.returncode is None for process in self.processes)

    async def start_relay(self) -> int:
        """A loopback port whose connections reach the runner once it listens: kwok reports a pod ready
        at once, where a real pod's readiness waits for its runner. Returns the port."""
        self.relay = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self.relay.sockets[0].getsockname()[1]

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        runner = await connect_when_listening(self.runner_port, self.alive)
        if runner is None:
            writer.close()
            return
        runner_reader, runner_writer = runner
        await asyncio.gather(copy(reader, runner_writer), copy(runner_reader, writer), return_exceptions=True)

    async def stop(self) -> None:
        if self.relay is not None:
            self.relay.close()
        for task in (self.runner_start, self.readiness):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        for process in self.processes:
            if process.returncode is None:
                process.terminate()
        for process in self.processes:
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


def runner_container(pod: client.V1Pod) -> client.V1Container | None:
    """The pod's container running the runner (the first one whose command names it)."""
    for container in pod.spec.containers:
        if "agentbox.sandbox.runner" in " ".join((container.command or []) + (container.args or [])):
            return container
    return None


def runner_env(pod: client.V1Pod) -> dict[str, str]:
    """The plain-valued environment of the pod's runner container."""
    container = runner_container(pod)
    env = (container.env if container else None) or []
    return {var.name: var.value for var in env if var.value is not None}


def port_forward(pod: client.V1Pod, local_port: int) -> dict:
    """kwok's PortForward for the pod: each port of its runner container leads to the local runner."""
    container = runner_container(pod)
    ports = [port.container_port for port in (container.ports if container else None) or []]
    if not ports:
        raise ValueError(f"pod {pod.metadata.name} has no runner container with a port")
    return {"apiVersion": f"{KWOK_GROUP}/{KWOK_VERSION}", "kind": "PortForward",
            "metadata": {"name": pod.metadata.name, "namespace": pod.metadata.namespace,
                         "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": pod.metadata.name,
                                              "uid": pod.metadata.uid}]},
            "spec": {"forwards": [{"ports": ports, "target": {"address": "127.0.0.1", "port": local_port}}]}}


def gateway_config_for(rendered: str, secrets_dir: Path) -> str:
    """The pod's gateway.json with mounted-secret paths pointing at the local copies."""
    return rendered.replace(IN_POD_SECRETS, f"{secrets_dir}/")


@dataclass(frozen=True)
class PodFiles:
    secrets: Path
    config: Path
    workspace: Path
    gateway_config: Path
    # The gateway's working directory: empty, as the image's /workspace is for the pod's sidecar (the
    # workspace volume is the runner's alone), so its stdio servers see neither the workspace nor secrets.
    gateway_workdir: Path


def lay_out_pod_files(workdir: Path, secret_files: dict[str, bytes],
                      config_files: dict[str, str]) -> PodFiles:
    """What the pod would mount, as local folders; the workspace survives restarts, like the PVC."""
    layout = PodFiles(workdir / "secrets", workdir / "config", workdir / "workspace",
                      workdir / "config" / "gateway.local.json", workdir / "gateway")
    for folder, files in ((layout.secrets, secret_files), (layout.config, config_files),
                          (layout.gateway_workdir, {})):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        for key, value in files.items():
            (folder / key).write_bytes(value if isinstance(value, bytes) else value.encode())
    layout.workspace.mkdir(parents=True, exist_ok=True)
    rendered = config_files.get("gateway.json", json.dumps({"upstreams": []}))
    layout.gateway_config.write_text(gateway_config_for(rendered, layout.secrets))
    return layout


async def spawn(module: str, env: dict[str, str], cwd: Path, log_file: Path) -> asyncio.subprocess.Process:
    """`python -m module` with its output in log_file."""
    output = await asyncio.to_thread(open, log_file, "ab")
    with output:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", module, env=env, cwd=cwd, stdin=asyncio.subprocess.DEVNULL, stdout=output,
            stderr=asyncio.subprocess.STDOUT)


async def start_runner_after_gateway(stand_in: StandIn, gateway_port: int, env: dict[str, str],
                                     workdir: Path) -> None:
    """The runner starts once the gateway listens, as in a pod whose gateway sidecar has a startup probe:
    the agent's first tool call finds the gateway (it connects its upstreams, a stdio server's start
    included, before it listens)."""
    gateway = await connect_when_listening(gateway_port, stand_in.alive)
    if gateway is None:
        log.warning("the gateway of %s/%s did not listen in %ss", stand_in.namespace, stand_in.session,
                    STARTUP_GRACE_SECONDS)
        raise RuntimeError("the gateway did not start")
    gateway[1].close()
    stand_in.runner = await spawn("agentbox.sandbox.runner", env, workdir, workdir / "runner.log")
    stand_in.processes.append(stand_in.runner)


class Supervisor:
    def __init__(self, api: client.ApiClient, state_dir: Path, namespace_prefix: str) -> None:
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.state_dir = state_dir
        self.namespace_prefix = namespace_prefix
        self.stand_ins: dict[tuple[str, str], StandIn] = {}

    async def reconcile(self) -> None:
        pods = await self.core.list_pod_for_all_namespaces(label_selector=POD_SELECTOR)
        wanted = {}
        for pod in pods.items:
            # From Pending on, not Running: kwok reports a pod ready at once, where a real one waits for its
            # readiness probe; the head start narrows the seconds in which the API answers 503.
            if (pod.metadata.namespace.startswith(self.namespace_prefix) and pod.status.phase in LIVE_PHASES
                    and not pod.metadata.deletion_timestamp):
                wanted[(pod.metadata.namespace, pod.metadata.labels[SESSION_LABEL])] = pod
        restarted = set()
        for key, stand_in in list(self.stand_ins.items()):
            pod = wanted.get(key)
            if pod is None or pod.metadata.uid != stand_in.pod_uid or not stand_in.alive():
                log.info("stopping the stand-in of %s/%s", *key)
                del self.stand_ins[key]
                exited = stand_in.runner_exit()  # on its own, before the stop ends it
                await stand_in.stop()
                if pod is not None and pod.metadata.uid == stand_in.pod_uid and exited is not None:
                    await self._runner_exited(pod, *exited)
                    restarted.add(key)
        for key, pod in wanted.items():
            if key not in self.stand_ins:
                try:
                    self.stand_ins[key] = stand_in = await self.start(pod)
                except (ApiException, OSError, ValueError) as error:
                    log.warning("cannot stand in for %s/%s yet: %s", *key, error)
                    continue
                if key in restarted:
                    stand_in.readiness = asyncio.create_task(self._ready_again(stand_in, pod))

    async def _pod_status(self, pod: client.V1Pod) -> dict:
        fresh = await self.core.read_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace)
        return self.core.api_client.sanitize_for_serialization(fresh.status)

    async def _runner_exited(self, pod: client.V1Pod, exit_code: int, message: str) -> None:
        log.info("the runner of pod %s/%s exited with code %s", pod.metadata.namespace, pod.metadata.name,
                 exit_code)
        when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        try:
            patch = runner_exited(await self._pod_status(pod), exit_code, message, when)
            await self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace,
                                                        {"status": patch})
        except ApiException as error:  # the pod went meanwhile
            log.warning("cannot record the runner's exit on pod %s: %s", pod.metadata.name, error.reason)

    async def _ready_again(self, stand_in: StandIn, pod: client.V1Pod) -> None:
        """Poll the restarted runner's /readyz, as the pod's readiness probe would, until it is ready."""
        async with aiohttp.ClientSession() as http:
            while True:
                await asyncio.sleep(POLL_SECONDS)
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"{stand_in.runner_url}/readyz") as response:
                        if response.status == 200:
                            break
        try:
            patch = runner_ready_again(await self._pod_status(pod))
            await self.core.patch_namespaced_pod_status(pod.metadata.name, pod.metadata.namespace,
                                                        {"status": patch})
        except ApiException as error:  # the pod went meanwhile
            log.warning("cannot mark pod %s ready again: %s", pod.metadata.name, error.reason)

    async def _volume_files(self, pod: client.V1Pod) -> tuple[dict[str, bytes], dict[str, str]]:
        """The contents of the pod's Secret and ConfigMap volumes, key by key."""
        secret_files: dict[str, bytes] = {}
        config_files: dict[str, str] = {}
        namespace = pod.metadata.namespace
        for volume in pod.spec.volumes or []:
            if volume.secret:
                secret = await self.core.read_namespaced_secret(volume.secret.secret_name, namespace)
                for key, value in (secret.data or {}).items():
                    secret_files[key] = base64.b64decode(value)
            elif volume.config_map:
                config_map = await self.core.read_namespaced_config_map(volume.config_map.name, namespace)
                config_files.update(config_map.data or {})
        if "runner-token" not in secret_files:
            raise ValueError("the session's Secret has no runner-token")
        return secret_files, config_files

    async def start(self, pod: client.V1Pod) -> StandIn:
        namespace, session = pod.metadata.namespace, pod.metadata.labels[SESSION_LABEL]
        workdir = self.state_dir / namespace / pod.metadata.name
        runner_port, gateway_port = free_port(), free_port()
        stand_in = StandIn(namespace, session, pod.metadata.uid, runner_port)
        try:  # the forward first: the relay holds what comes early until the runner listens
            await self._forward(port_forward(pod, await stand_in.start_relay()))
            secret_files, config_files = await self._volume_files(pod)
        except BaseException:
            await stand_in.stop()
            raise
        layout = await asyncio.to_thread(lay_out_pod_files, workdir, secret_files, config_files)
        stand_in.termination_log = workdir / "termination-log"
        stand_in.termination_log.unlink(missing_ok=True)  # a new file for each start, as the kubelet makes
        base_env = {key: value for key, value in os.environ.items() if not key.startswith("AGENTBOX_")}
        # As in the image, `python` on PATH is the sandbox's own interpreter: a stdio MCP server configured
        # as `python -m ...` (agentbox.sandbox.demo_tools) starts the same way here and in a real pod.
        interpreter_dir = str(Path(sys.executable).parent)
        base_env["PATH"] = os.pathsep.join([interpreter_dir, base_env.get("PATH", os.defpath)])
        runner = {**base_env, **runner_env(pod),
                  "AGENTBOX_RUNNER_HOST": "127.0.0.1", "AGENTBOX_RUNNER_PORT": str(runner_port),
                  "AGENTBOX_RUNNER_TOKEN_FILE": str(layout.secrets / "runner-token"),
                  "AGENTBOX_SYSTEM_PROMPT_FILE": str(layout.config / "system-prompt.md"),
                  "AGENTBOX_GATEWAY_URL": f"http://127.0.0.1:{gateway_port}/mcp",
                  "AGENTBOX_WORKSPACE": str(layout.workspace),
                  "AGENTBOX_TERMINATION_MESSAGE_FILE": str(stand_in.termination_log),
                  # The pod's /tmp emptyDir outlives the runner's restarts, not the pod.
                  "AGENTBOX_NEEDS_AUTH_FILE": str(workdir / f"needs-auth-{pod.metadata.uid}")}
        gateway = {**base_env, "AGENTBOX_GATEWAY_CONFIG": str(layout.gateway_config),
                   "AGENTBOX_GATEWAY_PORT": str(gateway_port)}
        try:
            stand_in.processes.append(await spawn("agentbox.sandbox.gateway", gateway, layout.gateway_workdir,
                                                  workdir / "gateway.log"))
        except BaseException:
            await stand_in.stop()
            raise
        stand_in.runner_start = asyncio.create_task(start_runner_after_gateway(stand_in, gateway_port, runner,
                                                                               workdir))
        log.info("standing in for pod %s/%s (session %s): runner on %s", namespace, pod.metadata.name,
                 session, stand_in.runner_url)
        return stand_in

    async def _forward(self, body: dict) -> None:
        """Create the pod's PortForward, or take over the one a previous pod of the same name left."""
        namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self.custom.create_namespaced_custom_object(KWOK_GROUP, KWOK_VERSION, namespace,
                                                              PORT_FORWARDS, body)
        except ApiException as error:
            if error.status != 409:
                raise
            await self.custom.patch_namespaced_custom_object(
                KWOK_GROUP, KWOK_VERSION, namespace, PORT_FORWARDS, name,
                {"metadata": {"ownerReferences": body["metadata"]["ownerReferences"]}, "spec": body["spec"]},
                _content_type="application/merge-patch+json")

    async def stop_all(self) -> None:
        for stand_in in self.stand_ins.values():
            await stand_in.stop()
        self.stand_ins.clear()


async def run(args: argparse.Namespace) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(args.kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        supervisor = Supervisor(api, args.state_dir, args.namespace_prefix)
        stop, wake = asyncio.Event(), asyncio.Event()

        def shut_down() -> None:
            stop.set()
            wake.set()

        for signum in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(signum, shut_down)
        watching = asyncio.create_task(watch_pods(supervisor.core, args.namespace_prefix, wake))
        ready = False
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    await supervisor.reconcile()
                except (ApiException, OSError) as error:  # apiserver restarts: try again next round
                    log.warning("listing session pods failed: %s", error)
                else:
                    if not ready and args.ready_file:
                        args.ready_file.write_text("ready\n")
                        log.info("standing in for session pods in namespaces %s*", args.namespace_prefix)
                    ready = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_SECONDS)
        finally:
            watching.cancel()
            await supervisor.stop_all()


async def watch_pods(core: client.CoreV1Api, namespace_prefix: str, changed: asyncio.Event) -> None:
    """Sets `changed` on every change to a session pod of ours, so a new one is stood in for at once
    (the periodic pass alone would leave it unreachable for up to POLL_SECONDS after it is Ready)."""
    while True:
        try:
            async with watch.Watch() as pods:
                async for event in pods.stream(core.list_pod_for_all_namespaces, label_selector=POD_SELECTOR,
                                               timeout_seconds=300):
                    if event["object"].metadata.namespace.startswith(namespace_prefix):
                        changed.set()
        except (ApiException, OSError, aiohttp.ClientError, TimeoutError) as error:  # apiserver restarts
            log.warning("watching session pods failed: %s", error)
            await asyncio.sleep(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/session_runners.py", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, help="written once the first pass over the pods is done")
    parser.add_argument("--namespace-prefix", default="tenant-", help="stand in only for pods in these")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
