"""Real session pods against kwok's: create -> Running p50/p99 for AgentSessions whose pods run as
containers on the real node (hack/real-node.sh), beside the same sessions on kwok's fake nodes, at each
`--rates` per second. JSON on stdout, progress on stderr.

    python -m bench.bench_realnode [--sessions 20 --rates 1 5]

Three series at each rate: cold sessions on the real node, the same claiming the members of a full
AgentSessionPool on the real node (`real-warm`: the pool's pods started before the clock starts), and cold
ones on kwok.

Running means the runner's readiness probe passed: on the real node, two Python processes started in a
PSS-restricted pod with its workspace claim mounted; on kwok, the same objects with nothing started. The
machine's cores bound the real rate: the CPU each session's start costs is reported per process, the real
node's parts (containerd, kubelet...) and its pods' containers included.
With AGENTBOX_REAL_NODE=0 (no real node) it reports itself skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config

from agentbox.crds import agentsessionpool
from agentbox.operator.kube import Kube
from bench.bench_operator import (
    ClusterCpu,
    RunningWatch,
    clear_earlier_runs,
    cluster_kubeconfig,
    create_paced,
    install_crds,
    latency_ms,
    pool_ready,
)
from tests.fixtures.cluster import REAL_NODE_ENABLED, REAL_NODE_PLACEMENT, cache_dir
from tests.operator.operator_harness import OperatorProcess, session_manifest

# Small requests so that the node's two cores admit every session; limits a Python process lives within.
RUNNER = {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "512Mi"}}
GATEWAY = {"requests": {"cpu": "10m", "memory": "48Mi"}, "limits": {"memory": "256Mi"}}


def log(message: str) -> None:
    print(f"bench_realnode: {message}", file=sys.stderr, flush=True)


def real_node_parts() -> dict[str, int]:
    """The real node's processes, by the pid files hack/real-node.sh keeps."""
    pids = (cache_dir() / "real-node" / "pids").glob("*.pid")
    return {path.stem: int(path.read_text()) for path in pids}


def pods_cpu_seconds() -> float:
    """CPU the real node's containers used so far: its cgroup root (cgroup v1 cpuacct, or v2)."""
    v1 = Path("/sys/fs/cgroup/cpuacct/agentbox/cpuacct.usage")
    if v1.exists():
        return int(v1.read_text()) / 1e9
    stat = dict(line.split() for line in Path("/sys/fs/cgroup/agentbox/cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"]) / 1e6


async def one_series(api: client.ApiClient, kubeconfig: str, where: str, sessions: int, rate: float,
                     workdir: str) -> dict[str, Any]:
    ops = Kube(api)
    await clear_earlier_runs(api)
    namespace = f"bench-rn-{where}-{os.urandom(3).hex()}"
    await ops.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    env = {"AGENTBOX_LOG_LEVEL": "warning", "AGENTBOX_GATEWAY_RESOURCES": json.dumps(GATEWAY)}
    log_path = f"{workdir}/operator-{where}-{rate:g}.log"
    operator = OperatorProcess(kubeconfig, log_path, scope=namespace, env=env)
    placement = REAL_NODE_PLACEMENT if where.startswith("real") else {}
    operator.start()
    try:
        await operator.wait_alive()
        assert operator.process is not None
        if where == "real-warm":
            await ops.create({"apiVersion": agentsessionpool.API_VERSION, "kind": agentsessionpool.KIND,
                              "metadata": {"name": "bench", "namespace": namespace},
                              "spec": {"replicas": sessions, "template": {
                                  "agent": {"runtime": "scripted"}, "resources": RUNNER, **placement}}})
            log(f"waiting for {sessions} pool members on the real node")
            await pool_ready(ops, namespace, "bench", sessions, seconds=600)
        running = RunningWatch(api, namespace)
        names = [f"s-{index:03d}" for index in range(sessions)]
        log(f"{sessions} sessions on {where} nodes at {rate:g}/s in {namespace}")
        cpu = ClusterCpu(kubeconfig, {"operator": operator.process.pid, "benchmark": os.getpid(),
                                      **real_node_parts()})
        cpu.start()
        pods_before = pods_cpu_seconds()
        created = await create_paced(ops, namespace, names, rate, lambda name: [
            session_manifest(name, namespace, resources=RUNNER, **placement)])
        await running.wait_for(names, seconds=600)
        load = cpu.stop(sessions)
        pods_cpu = pods_cpu_seconds() - pods_before
        running.task.cancel()
        return {"create_to_running_ms": latency_ms(created, running.running_at),
                **({"claimed_from_pool": len(running.warm)} if where == "real-warm" else {}),
                "machine_busy_percent": load["machine_busy_percent"],
                "cpu_ms_per_session": {**load["cpu_ms_per_session"],
                                       "real_node_containers": round(1000 * pods_cpu / sessions, 1)}}
    finally:
        operator.stop()
        await ops.delete("Namespace", None, namespace)


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 5.0])
    args = parser.parse_args()
    result: dict[str, Any] = {"benchmark": "realnode", "sessions": args.sessions}
    if not REAL_NODE_ENABLED:
        skipped = "needs the real node, which AGENTBOX_REAL_NODE=0 turns off"
        print(json.dumps({**result, "skipped": skipped}, indent=2))
        return 0

    kubeconfig = cluster_kubeconfig()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    await install_crds(kubeconfig, configuration)
    workdir = tempfile.mkdtemp(prefix="bench-realnode-")
    async with client.ApiClient(configuration=configuration) as api:
        for rate in args.rates:
            for where in ("real", "real-warm", "kwok"):
                result[f"{where}_at_{rate:g}_per_second"] = await one_series(
                    api, kubeconfig, where, args.sessions, rate, workdir)
        await clear_earlier_runs(api)
    result["operator_logs"] = workdir
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
