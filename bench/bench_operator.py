"""Operator benchmark on the local kwok cluster. JSON on stdout, progress on stderr.

1. `--sessions` AgentSessions created at `--rate` per second: create -> Running latency p50/p95/p99
   (Running seen through a watch on the sessions).
2. More sessions up to `--hold` Running, then `--hold-seconds` of nothing happening: the operator's
   peak RSS and CPU (share of one core) over that window.

    python -m bench.bench_operator [--sessions 200 --rate 20 --hold 1000 --hold-seconds 60]

The cluster is `hack/cluster.sh up` for $AGENTBOX_CLUSTER_NAME (default agentbox); the operator runs
as a subprocess serving only the benchmark's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from kubernetes_asyncio import client, config, watch

from agentbox.crds import agentsession
from agentbox.operator.kube import Kube
from tests.operator.operator_harness import OperatorProcess, session_manifest

REPO = Path(__file__).resolve().parent.parent
TINY = {"requests": {"cpu": "1m", "memory": "1Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}}


def log(message: str) -> None:
    print(f"bench_operator: {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def cluster_kubeconfig() -> str:
    env = {**os.environ, "AGENTBOX_CLUSTER_NAME": os.environ.get("AGENTBOX_CLUSTER_NAME", "agentbox")}
    done = subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


class RunningWatch:
    """Remembers when each session of the namespace was first seen Running."""

    def __init__(self, api: client.ApiClient, namespace: str):
        self.api, self.namespace = api, namespace
        self.running_at: dict[str, float] = {}
        self.pod_at: dict[str, float] = {}  # the operator's own part: children and pod created
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        custom = client.CustomObjectsApi(self.api)
        while True:
            stream = watch.Watch()
            async with stream.stream(custom.list_namespaced_custom_object, agentsession.GROUP,
                                     agentsession.VERSION, self.namespace, agentsession.PLURAL,
                                     timeout_seconds=300) as events:
                async for event in events:
                    body = event["object"]
                    if (body.get("status") or {}).get("podName"):
                        self.pod_at.setdefault(body["metadata"]["name"], time.perf_counter())
                    if (body.get("status") or {}).get("phase") == "Running":
                        self.running_at.setdefault(body["metadata"]["name"], time.perf_counter())

    async def wait_for(self, names: list[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(name not in self.running_at for name in names):
            if time.monotonic() > deadline:
                missing = [name for name in names if name not in self.running_at]
                raise TimeoutError(f"{len(missing)} sessions never Running, e.g. {missing[:3]}")
            await asyncio.sleep(0.2)


async def create_paced(ops: Kube, namespace: str, names: list[str], rate: float) -> dict[str, float]:
    """Create at a steady rate (each create in its own task so a slow call does not delay the next)."""
    created: dict[str, float] = {}

    async def one(name: str) -> None:
        created[name] = time.perf_counter()
        await ops.create(session_manifest(name, namespace, resources=TINY))

    started, tasks = time.perf_counter(), []
    for index, name in enumerate(names):
        await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(one(name)))
    await asyncio.gather(*tasks)
    return created


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


async def idle_usage(pid: int, seconds: float) -> dict[str, float]:
    process = psutil.Process(pid)
    cpu_before, wall_before = process.cpu_times(), time.perf_counter()
    peak = 0
    while time.perf_counter() - wall_before < seconds:
        peak = max(peak, process.memory_info().rss)
        await asyncio.sleep(1)
    cpu_after, wall = process.cpu_times(), time.perf_counter() - wall_before
    busy = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    return {"peak_rss_mb": round(peak / 2**20, 1), "cpu_percent_of_one_core": round(100 * busy / wall, 2),
            "window_seconds": round(wall, 1)}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--hold", type=int, default=1000)
    parser.add_argument("--hold-seconds", type=float, default=60.0)
    args = parser.parse_args()

    kubeconfig = cluster_kubeconfig()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    namespace = f"bench-op-{os.urandom(3).hex()}"
    workdir = tempfile.mkdtemp(prefix="bench-operator-")
    operator = OperatorProcess(kubeconfig, f"{workdir}/operator.log", scope=namespace,
                               env={"AGENTBOX_LOG_LEVEL": "warning",
                                    "AGENTBOX_GATEWAY_RESOURCES": json.dumps(TINY)})
    async with client.ApiClient(configuration=configuration) as api:
        ops = Kube(api)
        await ops.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        operator.start()
        try:
            await operator.wait_alive()
            assert operator.process is not None
            running = RunningWatch(api, namespace)
            names = [f"s-{index:04d}" for index in range(args.sessions)]
            log(f"creating {len(names)} sessions at {args.rate}/s in {namespace}")
            cpu_before = cpu_seconds(operator.process.pid)
            created = await create_paced(ops, namespace, names, args.rate)
            await running.wait_for(names, seconds=300)
            cpu_per_session = (cpu_seconds(operator.process.pid) - cpu_before) / len(names)
            latencies = [running.running_at[name] - created[name] for name in names]
            pod_latencies = [running.pod_at[name] - created[name] for name in names if name in running.pod_at]

            more = [f"s-{index:04d}" for index in range(args.sessions, args.hold)]
            log(f"creating {len(more)} more, then holding {args.hold} Running for {args.hold_seconds:.0f}s")
            await create_paced(ops, namespace, more, 50.0)
            await running.wait_for(names + more, seconds=900)
            await asyncio.sleep(5)  # let the last status writes and events drain
            usage = await idle_usage(operator.process.pid, args.hold_seconds)
            running.task.cancel()
        finally:
            operator.stop()
            await ops.delete("Namespace", None, namespace)
    result = {
        "benchmark": "operator",
        "sessions": args.sessions, "rate_per_second": args.rate,
        "create_to_running_ms": {"p50": round(1000 * percentile(latencies, 0.50)),
                                 "p95": round(1000 * percentile(latencies, 0.95)),
                                 "p99": round(1000 * percentile(latencies, 0.99)),
                                 "max": round(1000 * max(latencies))},
        "create_to_pod_created_ms": {"p50": round(1000 * percentile(pod_latencies, 0.50)),
                                     "p99": round(1000 * percentile(pod_latencies, 0.99))},
        "operator_cpu_ms_per_session": round(1000 * cpu_per_session, 1),
        "held_running_sessions": args.hold,
        "idle": usage,
        "targets": {"p50_ms": 500, "p99_ms": 1500, "rss_mb": 250, "idle_cpu_percent": 2},
        "operator_log": f"{workdir}/operator.log",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
