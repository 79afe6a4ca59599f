"""Operator benchmark on the local kwok cluster. JSON on stdout, progress on stderr.

1. `--sessions` AgentSessions created at `--rate` per second: create -> Running latency p50/p95/p99
   (Running seen through a watch on the sessions).
2. Each of those sessions' last-activity annotation written once at `--rate`, as the API does on a message:
   the apiserver's requests per stamp (the stamp's own PATCH is one of them).
3. More sessions up to `--hold` Running, then `--hold-seconds` of nothing happening: the operator's
   peak RSS and CPU (share of one core) over that window.

    python -m bench.bench_operator [--sessions 200 --rate 20 --hold 1000 --hold-seconds 60]
    python -m bench.bench_operator --sessions 100 --rate 20 --hold 0 --hold-seconds 0   # latency only
    python -m bench.bench_operator ... --profile /tmp/operator.prof   # where the operator's CPU goes
    python -m bench.bench_operator --warm --sessions 50 --warm-rates 10 50   # pool claims against cold

While creating, the CPU each cluster process uses and the apiserver's requests per session (all clients:
a shared cluster's other work counts too) show where the load is.

`--baseline` runs no operator: the cluster's own floor at the same rate, the sandbox pod as the operator
renders it created straight to the apiserver, create -> Running as kwok reports it: bare; with its
workspace claim created beside it; and with the pod created only once its claim is bound (so the storage
path shows apart from the operator's own, and the two ways of ordering pod and claim compare).

The cluster is `hack/cluster.sh up` for $AGENTBOX_CLUSTER_NAME (default agentbox); the operator runs
as a subprocess serving only the benchmark's namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
from kubernetes_asyncio import client, config, watch

from agentbox.crds import agentsession, agentsessionpool
from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.crds.naming import LAST_ACTIVITY_ANNOTATION
from agentbox.operator.build.common import Session
from agentbox.operator.build.pod import build_pod
from agentbox.operator.build.pvc import build_pvc
from agentbox.operator.kube import Kube
from agentbox.operator.settings import OperatorSettings
from bench import CLUSTER_NAME
from tests.fixtures.cluster import Kube as ClusterTools
from tests.fixtures.cluster import apply_crds, cache_dir, read_versions
from tests.operator.operator_harness import OperatorProcess, session_manifest

REPO = Path(__file__).resolve().parent.parent
TINY = {"requests": {"cpu": "1m", "memory": "1Mi"}, "limits": {"cpu": "10m", "memory": "16Mi"}}


def log(message: str) -> None:
    print(f"bench_operator: {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * (len(ordered) - 1))))]


def cluster_kubeconfig() -> str:
    env = {**os.environ, "AGENTBOX_CLUSTER_NAME": CLUSTER_NAME}
    done = subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


async def install_crds(kubeconfig: str, configuration: client.Configuration) -> None:
    """This checkout's CRDs, as the test fixtures apply them (a new cluster has none)."""
    kubectl = cache_dir() / "bin" / f"kubernetes-{read_versions()['K8S_VERSION']}" / "kubectl"
    await apply_crds(ClusterTools(kubeconfig=Path(kubeconfig), kubectl_path=kubectl,
                                  _configuration=configuration))


class RunningWatch:
    """Remembers when each object of the namespace was first seen Running (sessions, or bare pods)."""

    def __init__(self, api: client.ApiClient, namespace: str, pods: bool = False):
        self.api, self.namespace, self.pods = api, namespace, pods
        self.running_at: dict[str, float] = {}
        self.pod_at: dict[str, float] = {}  # the operator's own part: children and pod created
        self.warm: set[str] = set()  # sessions that claimed a pool member
        self.task = asyncio.create_task(self._run())

    def _list_call(self) -> tuple[Any, ...]:
        if self.pods:
            return (client.CoreV1Api(self.api).list_namespaced_pod, self.namespace)
        return (client.CustomObjectsApi(self.api).list_namespaced_custom_object, agentsession.GROUP,
                agentsession.VERSION, self.namespace, agentsession.PLURAL)

    async def _run(self) -> None:
        list_call, *args = self._list_call()
        while True:
            stream = watch.Watch(return_type="object")  # plain dicts: the benchmark's own CPU stays small
            async with stream.stream(list_call, *args, timeout_seconds=300) as events:
                async for event in events:
                    body = event["object"]
                    status = body.get("status") or {}
                    if status.get("podName"):
                        self.pod_at.setdefault(body["metadata"]["name"], time.perf_counter())
                    if status.get("poolMember"):
                        self.warm.add(body["metadata"]["name"])
                    if status.get("phase") == "Running":
                        self.running_at.setdefault(body["metadata"]["name"], time.perf_counter())

    async def wait_for(self, names: list[str], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(name not in self.running_at for name in names):
            if time.monotonic() > deadline:
                missing = [name for name in names if name not in self.running_at]
                raise TimeoutError(f"{len(missing)} never Running, e.g. {missing[:3]}")
            await asyncio.sleep(0.2)


async def paced(names: list[str], rate: float, act: Callable[[str], Awaitable[None]]) -> None:
    """`act(name)` for each name at a steady rate (each in its own task so a slow call does not delay the
    next)."""
    started, tasks = time.perf_counter(), []
    for index, name in enumerate(names):
        await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
        tasks.append(asyncio.create_task(act(name)))
    await asyncio.gather(*tasks)


async def create_paced(ops: Kube, namespace: str, names: list[str], rate: float,
                       manifests: Callable[[str], list[dict[str, Any]]] | None = None,
                       then: Callable[[str], Awaitable[None]] | None = None) -> dict[str, float]:
    """Create at a steady rate. `manifests(name)`: what to create for each name, all at once (default: one
    AgentSession); `then(name)`: what follows once they exist."""
    created: dict[str, float] = {}

    async def one(name: str) -> None:
        created[name] = time.perf_counter()
        wanted = manifests(name) if manifests else [session_manifest(name, namespace, resources=TINY)]
        await asyncio.gather(*(ops.create(manifest) for manifest in wanted))
        if then is not None:
            await then(name)

    await paced(names, rate, one)
    return created


async def stamp_activity(api: client.ApiClient, namespace: str, names: list[str], rate: float
                         ) -> dict[str, Any]:
    """What the API writes on a message, once per session at a steady rate: the apiserver's requests per
    stamp (its own PATCH included), once what the operator does in answer has landed."""
    ops = Kube(api)
    stamp = {"metadata": {"annotations": {LAST_ACTIVITY_ANNOTATION: time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                   time.gmtime())}}}
    before = await apiserver_requests(api)
    await paced(names, rate, lambda name: ops.merge_patch(agentsession.KIND, namespace, name, stamp))
    await asyncio.sleep(3)
    return per_session(before, await apiserver_requests(api), len(names))


async def create_after_claims(api: client.ApiClient, ops: Kube, namespace: str, names: list[str], rate: float,
                              render: Callable[[str], list[dict[str, Any]]]) -> dict[str, float]:
    """Each claim at the steady rate, its pod as soon as a watch sees the claim Bound."""
    bound: collections.defaultdict[str, asyncio.Event] = collections.defaultdict(asyncio.Event)
    pods: dict[str, dict[str, Any]] = {}
    claims: dict[str, str] = {}

    async def follow_claims() -> None:
        core = client.CoreV1Api(api)
        while True:
            async with watch.Watch(return_type="object").stream(
                    core.list_namespaced_persistent_volume_claim, namespace, timeout_seconds=300) as events:
                async for event in events:
                    claim = event["object"]
                    if (claim.get("status") or {}).get("phase") == "Bound":
                        bound[claim["metadata"]["name"]].set()

    def claim_only(name: str) -> list[dict[str, Any]]:
        claim, pods[name] = render(name)
        claims[name] = claim["metadata"]["name"]
        return [claim]

    async def pod_once_bound(name: str) -> None:
        await bound[claims[name]].wait()
        await ops.create(pods[name])

    follower = asyncio.create_task(follow_claims())
    try:
        return await create_paced(ops, namespace, names, rate, claim_only, then=pod_once_bound)
    finally:
        follower.cancel()


def per_session(before: collections.Counter[str], after: collections.Counter[str], sessions: int
                ) -> dict[str, Any]:
    """Requests per session: the total, by verb, and by verb and resource (the largest first)."""
    served = after - before
    verbs: collections.Counter[str] = collections.Counter()
    for key, count in served.items():
        verbs[key.split(" ", 1)[0]] += count
    return {"total": round(sum(served.values()) / sessions, 1),
            **{verb: round(count / sessions, 1) for verb, count in sorted(verbs.items())},
            "by_resource": {key: round(count / sessions, 2) for key, count in served.most_common()
                            if count / sessions >= 0.05}}


def latency_ms(started: dict[str, float], reached: dict[str, float]) -> dict[str, int]:
    values = [reached[name] - started[name] for name in started if name in reached]
    return {"p50": round(1000 * percentile(values, 0.50)), "p95": round(1000 * percentile(values, 0.95)),
            "p99": round(1000 * percentile(values, 0.99)), "max": round(1000 * max(values))}


def sandbox_children(namespace: str, with_claim: bool) -> Callable[[str], list[dict[str, Any]]]:
    """The pod (and claim) the operator would render for a benchmark session, without an owner: nothing
    reconciles them, and garbage collection must not take them for orphans."""
    settings = OperatorSettings(gateway_resources=TINY)

    def render(name: str) -> list[dict[str, Any]]:
        spec = AgentSessionSpec.model_validate(session_manifest(name, namespace, resources=TINY)["spec"])
        session = Session(name, namespace, "baseline", spec)
        pod = build_pod(session, image=settings.sandbox_image, pull_policy=settings.image_pull_policy,
                        config_digest="baseline", runner_resources=settings.runner_resources,
                        gateway_resources=settings.gateway_resources)
        pod["metadata"]["name"] = name  # the watch reports pods by name
        children = [build_pvc(session), pod] if with_claim else [pod]
        if not with_claim:
            pod["spec"]["volumes"] = [v for v in pod["spec"]["volumes"] if "persistentVolumeClaim" not in v]
            for container in [*pod["spec"]["initContainers"], *pod["spec"]["containers"]]:
                container["volumeMounts"] = [m for m in container["volumeMounts"] if m["name"] != "workspace"]
        for child in children:
            del child["metadata"]["ownerReferences"]
        return children

    return render


async def clear_earlier_runs(api: client.ApiClient, seconds: float = 600) -> None:
    """Delete what earlier runs left (a killed run keeps its namespace) and wait until it is gone: hundreds
    of pods, claims and volumes being deleted alongside would add their load to this run's figures."""
    core = client.CoreV1Api(api)
    deadline = time.monotonic() + seconds
    while True:
        left = [ns for ns in (await core.list_namespace()).items if ns.metadata.name.startswith("bench-")]
        for ns in left:
            if ns.metadata.deletion_timestamp is None:
                await core.delete_namespace(ns.metadata.name)
        # Their claims' volumes are reclaimed after the namespace is gone.
        volumes = [pv for pv in (await core.list_persistent_volume()).items
                   if ((pv.spec.claim_ref and pv.spec.claim_ref.namespace) or "").startswith("bench-")]
        if not left and not volumes:
            return
        waiting = f"{len(left)} namespaces and {len(volumes)} volumes from earlier runs"
        if time.monotonic() > deadline:
            raise SystemExit(f"bench_operator: {waiting} still being deleted after {seconds:.0f} s")
        log(f"waiting for {waiting} to be deleted")
        await asyncio.sleep(5)


async def baseline(api: client.ApiClient, kubeconfig: str, sessions: int, rate: float) -> dict[str, Any]:
    """The cluster's own create -> Running at the benchmark's rate, with no operator in the path."""
    ops = Kube(api)
    result: dict[str, Any] = {"benchmark": "operator-baseline", "sessions": sessions, "rate_per_second": rate}
    for series, with_claim in (("pod", False), ("pod_with_claim", True), ("pod_after_claim", True)):
        await clear_earlier_runs(api)
        namespace = f"bench-base-{os.urandom(3).hex()}"
        await ops.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        try:
            running = RunningWatch(api, namespace, pods=True)
            names = [f"b-{index:04d}" for index in range(sessions)]
            log(f"baseline {series}: {len(names)} pods at {rate}/s in {namespace}")
            cpu = ClusterCpu(kubeconfig, {"benchmark": os.getpid()})
            cpu.start()
            requests_before = await apiserver_requests(api)
            render = sandbox_children(namespace, with_claim)
            if series == "pod_after_claim":
                created = await create_after_claims(api, ops, namespace, names, rate, render)
            else:
                created = await create_paced(ops, namespace, names, rate, render)
            await running.wait_for(names, seconds=300)
            result[f"{series}_cpu"] = cpu.stop(sessions)
            result[f"{series}_apiserver_requests_per_pod"] = per_session(
                requests_before, await apiserver_requests(api), sessions)
            running.task.cancel()
            result[f"{series}_create_to_running_ms"] = latency_ms(created, running.running_at)
        finally:
            await ops.delete("Namespace", None, namespace)
    return result


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


REQUEST_TOTAL = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<count>\S+)$', re.MULTILINE)
LABEL = re.compile(r'(\w+)="([^"]*)"')


async def apiserver_requests(api: client.ApiClient) -> collections.Counter[str]:
    """Requests the apiserver has served so far, keyed "VERB resource[/subresource]" (WATCH left out:
    streams, not work items)."""
    text = await api.call_api("/metrics", "GET", auth_settings=["BearerToken"],
                              response_types_map={200: "str"}, _return_http_data_only=True)
    served: collections.Counter[str] = collections.Counter()
    for match in REQUEST_TOTAL.finditer(text):
        labels = dict(LABEL.findall(match["labels"]))
        verb = labels.get("verb")
        if verb and verb != "WATCH":
            resource = labels.get("resource", "") + (f"/{labels['subresource']}" if labels.get("subresource")
                                                     else "")
            served[f"{verb} {resource}"] += int(float(match["count"]))
    return served


class ClusterCpu:
    """CPU seconds each cluster process (and the whole machine) spends between start() and stop(): shows
    whether the apiserver, etcd or kwok, rather than the operator, is the bottleneck. The benchmark's own
    process shares the machine too, and is counted."""

    def __init__(self, kubeconfig: str, extra: dict[str, int] | None = None):
        cluster_dir = Path(kubeconfig).parent
        pid_files = {path.stem: path for path in (cluster_dir / "pids").glob("*.pid")}
        pid_files["storage-provisioner"] = cluster_dir / "storage-provisioner.pid"
        self.pids = {name: int(path.read_text()) for name, path in pid_files.items() if path.exists()}
        self.pids.update(extra or {})

    def start(self) -> None:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.machine_before, self.wall_before = psutil.cpu_times(), time.perf_counter()

    def stop(self, sessions: int) -> dict[str, Any]:
        """Also the CPU each process spent per session: what the machine's cores divide into a ceiling on
        the rate it can sustain at all."""
        wall = time.perf_counter() - self.wall_before
        machine = psutil.cpu_times()
        idle = (machine.idle - self.machine_before.idle) / wall / psutil.cpu_count()
        spent = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        return {"window_seconds": round(wall, 1), "machine_busy_percent": round(100 * (1 - idle)),
                "cores_used": {name: round(seconds / wall, 2) for name, seconds in spent.items()},
                "cpu_ms_per_session": {name: round(1000 * seconds / sessions, 1)
                                       for name, seconds in spent.items()}}


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


async def pool_ready(ops: Kube, namespace: str, name: str, replicas: int, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while True:
        status = ((await ops.get(agentsessionpool.KIND, namespace, name)) or {}).get("status") or {}
        pods = await ops.list("Pod", namespace)
        settled = not any(pod["metadata"].get("deletionTimestamp") for pod in pods)
        if status.get("ready") == replicas and status.get("replicas") == replicas and settled:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"pool {name} not refilled: {status}")
        await asyncio.sleep(0.5)


async def warm_against_cold(api: client.ApiClient, ops: Kube, namespace: str, sessions: int,
                            rates: list[float], cpu: ClusterCpu) -> dict[str, Any]:
    """At each rate: `sessions` sessions claiming members of a full pool (warm), then as many of a
    template no pool serves (cold), on the same cluster in the same run; each series' sessions are deleted,
    and the pool refilled, before the next."""
    replicas = min(sessions, agentsessionpool.MAX_REPLICAS)
    await ops.create({"apiVersion": agentsessionpool.API_VERSION, "kind": agentsessionpool.KIND,
                      "metadata": {"name": "bench", "namespace": namespace},
                      "spec": {"replicas": replicas, "template": {"agent": {"runtime": "scripted"},
                                                                   "resources": TINY}}})
    results: dict[str, Any] = {}
    for rate in rates:
        for series in ("warm", "cold"):
            await pool_ready(ops, namespace, "bench", replicas)
            running = RunningWatch(api, namespace)
            names = [f"{series[0]}{int(rate)}-{index:03d}" for index in range(sessions)]
            agent = {"runtime": "scripted"} if series == "warm" else {"runtime": "scripted", "args": ["cold"]}
            log(f"{series}: {sessions} sessions at {rate}/s")
            cpu.start()
            requests_before = await apiserver_requests(api)
            created = await create_paced(ops, namespace, names, rate, lambda name, agent=agent: [
                session_manifest(name, namespace, resources=TINY, agent=agent)])
            await running.wait_for(names, seconds=300)
            running.task.cancel()
            # Until the last session runs, refill included: what the claims and the pool's upkeep cost.
            load = cpu.stop(sessions)
            results[f"{series}_{rate:g}_per_second"] = {
                "create_to_running_ms": latency_ms(created, running.running_at),
                "claimed_from_pool": len(running.warm & set(names)),
                "apiserver_requests_per_session": per_session(requests_before, await apiserver_requests(api),
                                                              sessions),
                "cluster_cpu": load}
            await asyncio.gather(*(ops.delete(agentsession.KIND, namespace, name) for name in names))
    return results


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--hold", type=int, default=1000)
    parser.add_argument("--hold-seconds", type=float, default=60.0)
    parser.add_argument("--profile", metavar="PATH", help="cProfile the operator into PATH (pstats format)")
    parser.add_argument("--baseline", action="store_true",
                        help="no operator: bare sandbox pods (and pods with claims) at the same rate")
    parser.add_argument("--warm", action="store_true",
                        help="warm pool claims against cold starts at each of --warm-rates (--sessions each)")
    parser.add_argument("--warm-rates", type=float, nargs="+", default=[10.0, 50.0])
    args = parser.parse_args(argv)

    kubeconfig = cluster_kubeconfig()
    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    await install_crds(kubeconfig, configuration)
    if args.baseline:
        async with client.ApiClient(configuration=configuration) as api:
            print(json.dumps(await baseline(api, kubeconfig, args.sessions, args.rate), indent=2))
        return 0
    namespace = f"bench-op-{os.urandom(3).hex()}"
    workdir = tempfile.mkdtemp(prefix="bench-operator-")
    operator = OperatorProcess(kubeconfig, f"{workdir}/operator.log", scope=namespace,
                               env={"AGENTBOX_LOG_LEVEL": os.environ.get("AGENTBOX_LOG_LEVEL", "warning"),
                                    "AGENTBOX_GATEWAY_RESOURCES": json.dumps(TINY)}, profile=args.profile)
    async with client.ApiClient(configuration=configuration) as api:
        ops = Kube(api)
        await clear_earlier_runs(api)
        await ops.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
        operator.start()
        try:
            await operator.wait_alive()
            assert operator.process is not None
            if args.warm:
                cpu = ClusterCpu(kubeconfig, {"operator": operator.process.pid, "benchmark": os.getpid()})
                series = await warm_against_cold(api, ops, namespace, args.sessions, args.warm_rates, cpu)
                print(json.dumps({"benchmark": "operator-warm-pool", "sessions": args.sessions, **series,
                                  "targets": {"warm_p50_ms": 150, "warm_p99_ms": 400},
                                  "operator_log": f"{workdir}/operator.log"}, indent=2))
                return 0
            running = RunningWatch(api, namespace)
            names = [f"s-{index:04d}" for index in range(args.sessions)]
            log(f"creating {len(names)} sessions at {args.rate}/s in {namespace}")
            cpu = ClusterCpu(kubeconfig, {"operator": operator.process.pid, "benchmark": os.getpid()})
            cpu.start()
            requests_before = await apiserver_requests(api)
            created = await create_paced(ops, namespace, names, args.rate)
            await running.wait_for(names, seconds=300)
            load = cpu.stop(len(names))
            requests = per_session(requests_before, await apiserver_requests(api), len(names))
            latencies = latency_ms(created, running.running_at)
            pod_latencies = latency_ms(created, running.pod_at)
            log(f"stamping activity on {len(names)} sessions at {args.rate}/s, as the API does per message")
            activity = await stamp_activity(api, namespace, names, args.rate)

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
        "create_to_running_ms": latencies,
        "create_to_pod_created_ms": pod_latencies,
        "operator_cpu_ms_per_session": load["cpu_ms_per_session"]["operator"],
        "cpu_while_creating": load,
        "apiserver_requests_per_session": requests,
        "apiserver_requests_per_activity_stamp": activity,
        "held_running_sessions": args.hold,
        "idle": usage,
        "targets": {"p50_ms": 500, "p99_ms": 1500, "rss_mb": 250, "idle_cpu_percent": 2},
        "operator_log": f"{workdir}/operator.log",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
