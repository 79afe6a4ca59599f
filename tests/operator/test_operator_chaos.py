"""The operator SIGKILLed at random points during 50 creates converges with exactly one of each child."""

import asyncio
import random

import pytest
from fixtures.polling import eventually
from operator_harness import session_manifest

from agentbox.crds import agentsession
from agentbox.operator import naming

pytestmark = pytest.mark.cluster
SESSIONS = 50
# Small enough that 50 sessions fit the tenant's default quota (gateway and egress proxy included).
SMALL = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "50m", "memory": "64Mi"}}
KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "NetworkPolicy", "Pod")


async def stragglers(ops, namespace):
    """Each session short of Running: its phase, conditions and kopf progress, its pod's and claim's state."""
    lines = []
    for item in await ops.list(agentsession.KIND, namespace):
        status, meta = item.get("status") or {}, item["metadata"]
        if status.get("phase") == "Running":
            continue
        child = naming.child_name(meta["name"])
        pod = await ops.get("Pod", namespace, child)
        claim = await ops.get("PersistentVolumeClaim", namespace, child)
        progress = {key: value for key, value in (meta.get("annotations") or {}).items()
                    if key.startswith("operator.agentbox.dev/")}
        lines.append(f"{meta['name']}: phase {status.get('phase')}, observedGeneration "
                     f"{status.get('observedGeneration')}/{meta.get('generation')}, kopf progress {progress}")
        lines += [f"  {c['type']}={c['status']} {c.get('reason')}: {c.get('message')}"
                  for c in status.get("conditions") or []]
        if pod is None:
            lines.append("  pod: absent")
        else:
            pod_status = pod.get("status") or {}
            conditions = [(c["type"], c["status"], c.get("reason"))
                          for c in pod_status.get("conditions") or []]
            containers = [(c["name"], c.get("state")) for c in pod_status.get("containerStatuses") or []]
            lines.append(f"  pod: {pod_status.get('phase')} on {pod['spec'].get('nodeName')}, conditions "
                         f"{conditions}, containers {containers}")
        lines.append(f"  claim: {'absent' if claim is None else (claim.get('status') or {}).get('phase')}")
    return "\n".join(lines) or "every session listed is Running"


async def test_sigkill_during_creates_converges(operator, ops, tenant):
    rng = random.Random(3284)
    names = [f"chaos-{index:02d}" for index in range(SESSIONS)]

    async def create_all():
        for name in names:
            await ops.create(session_manifest(name, tenant, resources=SMALL))
            await asyncio.sleep(rng.uniform(0, 0.05))

    creating = asyncio.create_task(create_all())
    kills = 0
    while not creating.done() or kills < 3:
        await asyncio.sleep(rng.uniform(0.2, 1.0))
        operator.kill()
        kills += 1
        await asyncio.sleep(rng.uniform(0, 0.3))
        operator.start()
        await operator.wait_alive()
    await creating

    async def all_running():
        listing = await ops.list(agentsession.KIND, tenant)
        phases = [(item.get("status") or {}).get("phase") for item in listing]
        return len(listing) == SESSIONS and all(phase == "Running" for phase in phases)

    try:
        await eventually(all_running, timeout=120, interval=1, what="every session Running")
    except AssertionError as failure:
        raise AssertionError(f"{failure}\n{await stragglers(ops, tenant)}\n"
                             f"(the operator's log: {operator.log_path})") from None

    for kind in KINDS:
        items = await ops.list(kind, tenant, f"{naming.MANAGED_BY}={naming.MANAGER},{naming.SESSION_LABEL}")
        owners = sorted(
            item["metadata"]["labels"][naming.SESSION_LABEL]
            for item in items
            if not item["metadata"].get("deletionTimestamp")
        )
        assert owners == sorted(names), f"{kind}: expected one per session"
        for item in items:
            (owner,) = item["metadata"]["ownerReferences"]
            assert owner["controller"] is True
