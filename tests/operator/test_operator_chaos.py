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
# Small enough that 50 sessions fit the tenant's default quota (gateway included).
SMALL = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "100m", "memory": "64Mi"}}
KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "NetworkPolicy", "Pod")


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

    await eventually(all_running, timeout=120, interval=1)

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
