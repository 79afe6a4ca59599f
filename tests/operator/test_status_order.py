"""A status from an older pod never lands over one from a newer pod (the operator's status path, in this
process, against the real apiserver; no operator serves the namespace)."""

import asyncio
import logging

import kopf
from kopf._core.engines import posting  # kopf's Event context, which only a running operator sets
from operator_harness import session_manifest

from agentbox.crds import agentsession
from agentbox.operator.handlers import session
from agentbox.operator.settings import OperatorSettings


def pod(namespace, version, ready):
    conditions = [{"type": "PodScheduled", "status": "True"},
                  {"type": "Ready", "status": "True" if ready else "False"}]
    return {"metadata": {"name": "p", "namespace": namespace, "resourceVersion": str(version)},
            "spec": {"nodeName": "node-000000"},
            "status": {"phase": "Running" if ready else "Pending", "conditions": conditions}}


async def test_a_settled_status_never_lands_over_the_next_pods(ops, namespace):
    quiet = kopf.OperatorSettings()
    quiet.posting.enabled, quiet.posting.level = False, logging.CRITICAL + 1
    posting.settings_var.set(quiet)
    created = await ops.create(session_manifest("order", namespace))
    owner = {"metadata": {"namespace": namespace, "name": "order", "uid": created["metadata"]["uid"]}}
    key = (namespace, "order")

    # The scheduled pod's Starting is held back for SETTLE_SECONDS; the Ready pod's event is handled only
    # once that wait is over, and the held-back write has queued behind it (a busy operator's order).
    settings = OperatorSettings()
    await session.refresh(ops, settings, owner, pod(namespace, 100, ready=False))
    async with session._locks[key]:
        ready = asyncio.create_task(session.refresh(ops, settings, owner, pod(namespace, 101, ready=True)))
        await asyncio.sleep(session.SETTLE_SECONDS + 0.3)
    await ready
    await asyncio.sleep(0.5)  # the held-back write, had it gone out
    body = await ops.get(agentsession.KIND, namespace, "order")
    assert body["status"]["phase"] == "Running"
