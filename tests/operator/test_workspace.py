"""Whether a pod waits for its claim, when the StorageClass read fails in ways the local cluster cannot be
made to fail (the cluster tests cover Immediate, WaitForFirstConsumer and a missing class)."""

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.operator import workspace

PENDING = {"spec": {"storageClassName": "fast"}, "status": {"phase": "Pending"}}


class RefusingKube:
    def __init__(self, status: int):
        self.status, self.reads = status, 0

    async def get(self, kind, namespace, name):
        self.reads += 1
        raise ApiException(status=self.status, reason="refused")


@pytest.fixture(autouse=True)
def no_cached_modes(monkeypatch):
    monkeypatch.setattr(workspace, "_modes", {})


async def test_a_forbidden_class_lets_the_pod_go_and_is_not_asked_again():
    kube = RefusingKube(403)
    assert not await workspace.pod_waits_for(kube, PENDING)
    assert not await workspace.pod_waits_for(kube, PENDING)
    assert kube.reads == 1


async def test_a_server_error_lets_the_pod_go_and_is_asked_again():
    kube = RefusingKube(503)
    assert not await workspace.pod_waits_for(kube, PENDING)
    assert not await workspace.pod_waits_for(kube, PENDING)
    assert kube.reads == 2


async def test_a_bound_claim_or_no_class_needs_no_read():
    kube = RefusingKube(500)
    assert not await workspace.pod_waits_for(kube, {**PENDING, "status": {"phase": "Bound"}})
    assert await workspace.pod_waits_for(kube, {"spec": {}, "status": {"phase": "Pending"}})
    assert kube.reads == 0
