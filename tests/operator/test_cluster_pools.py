"""ClusterAgentSessionPool on the cluster: a pool of its own in each tenant namespace it selects, members
claimed there, pools dropped where it stops selecting, a namespace's own pool of the same name left alone."""

import contextlib
import os
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from fixtures.polling import eventually
from kubernetes_asyncio.client.exceptions import ApiException
from operator_harness import session_manifest
from test_pools import TEMPLATE, claimed_running, pool_manifest, pool_status

from agentbox.crds import agentsessionpool, clusteragentsessionpool
from agentbox.operator import naming

pytestmark = pytest.mark.cluster


def cluster_pool_manifest(name: str, replicas: int, selector: dict) -> dict:
    return {"apiVersion": clusteragentsessionpool.API_VERSION, "kind": clusteragentsessionpool.KIND,
            "metadata": {"name": name},
            "spec": {"replicas": replicas, "template": TEMPLATE, "namespaceSelector": selector}}


@pytest_asyncio.fixture(loop_scope="session")
async def tenants(kube, ops) -> AsyncIterator[tuple[str, list[str]]]:
    """Three tenant namespaces in the operator's scope, the first two labelled with a value of this test's
    own (the cluster pools select on it, so other tests' namespaces are never theirs)."""
    mark = os.urandom(3).hex()
    names = [f"t-op-{os.urandom(3).hex()}" for _ in range(3)]
    for index, name in enumerate(names):
        labels = {naming.TENANT_LABEL: name.removeprefix("t-"), "agentbox.dev/test-namespace": "true"}
        if index < 2:
            labels["agentbox.dev/test-pool"] = mark
        await ops.create({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": name, "labels": labels}})
        await kube.wait_for_default_account(name)
    yield mark, names
    for name in names:
        with contextlib.suppress(ApiException):
            await ops.delete("Namespace", None, name)


async def cluster_pool_status(ops, name: str, **wanted) -> dict:
    async def probe():
        body = await ops.get(clusteragentsessionpool.KIND, None, name)
        status = (body or {}).get("status") or {}
        current = status.get("observedGeneration") == body["metadata"]["generation"]
        return body if current and all(status.get(key) == value for key, value in wanted.items()) else None

    try:
        return await eventually(probe, timeout=60, what=f"cluster pool {name} to report {wanted}")
    except AssertionError:
        body = await ops.get(clusteragentsessionpool.KIND, None, name)
        raise AssertionError(f"cluster pool {name}: {(body or {}).get('status')}") from None


async def test_each_selected_tenant_gets_a_pool_of_its_own(operator, ops, tenants):
    mark, (first, second, unselected) = tenants
    name = f"cp-{mark}"
    await ops.create(cluster_pool_manifest(name, 1, {"matchLabels": {"agentbox.dev/test-pool": mark}}))
    try:
        body = await cluster_pool_status(ops, name, namespaces=2, ready=2, replicas=2)
        assert {c["type"]: c["reason"] for c in body["status"]["conditions"]} == {"Ready": "PoolsReady"}
        for namespace in (first, second):
            pool = await pool_status(ops, namespace, name, ready=1)
            [owner] = pool["metadata"]["ownerReferences"]
            assert (owner["kind"], owner["uid"]) == (clusteragentsessionpool.KIND, body["metadata"]["uid"])
            assert pool["spec"]["template"]["agent"]["runtime"] == "scripted"
        assert await ops.get(agentsessionpool.KIND, unselected, name) is None

        # A session claims a member of its own namespace's pool: the other tenant's stays unclaimed.
        await ops.create(session_manifest("ada", first, **TEMPLATE))
        member = (await claimed_running(ops, first, "ada"))["status"]["poolMember"]
        assert await ops.get("Pod", second, member) is None
        await cluster_pool_status(ops, name, namespaces=2, ready=2, claimed=1)

        # A spec change reaches every pool; a namespace no longer selected loses its pool.
        await ops.merge_patch(clusteragentsessionpool.KIND, None, name, {"spec": {"replicas": 2}})
        await pool_status(ops, second, name, ready=2)
        await ops.merge_patch("Namespace", None, second,
                              {"metadata": {"labels": {"agentbox.dev/test-pool": None}}})

        async def dropped():
            return await ops.get(agentsessionpool.KIND, second, name) is None

        await eventually(dropped, timeout=60, what=f"the pool in {second} to go")
        await cluster_pool_status(ops, name, namespaces=1, ready=2)
    finally:
        await ops.delete(clusteragentsessionpool.KIND, None, name)

    async def collected():
        return await ops.get(agentsessionpool.KIND, first, name) is None

    await eventually(collected, timeout=60, what="the kept pool to go with its cluster pool")


async def test_a_namespace_pool_of_the_same_name_is_left_alone(operator, ops, tenants):
    mark, (first, second, _) = tenants
    name = f"own-{mark}"
    await ops.create(pool_manifest(name, first, 0))
    await ops.create(cluster_pool_manifest(name, 1, {"matchExpressions": [
        {"key": "agentbox.dev/test-pool", "operator": "In", "values": [mark]}]}))
    try:
        body = await cluster_pool_status(ops, name, namespaces=1)
        [ready] = body["status"]["conditions"]
        assert (ready["status"], ready["reason"]) == ("False", "NameConflict") and first in ready["message"]
        own = await ops.get(agentsessionpool.KIND, first, name)
        assert own["spec"]["replicas"] == 0 and not own["metadata"].get("ownerReferences")
        await pool_status(ops, second, name, ready=1)
    finally:
        await ops.delete(clusteragentsessionpool.KIND, None, name)


async def test_a_label_key_the_apiserver_refuses_is_reported(operator, ops, tenant):
    # (`tenant`: kopf scoped to namespaces watches nothing, cluster-scoped kinds too, until one matches)
    name = f"bad-key-{os.urandom(3).hex()}"
    await ops.create(cluster_pool_manifest(name, 1, {"matchLabels": {"not a key!": "x"}}))
    try:
        body = await cluster_pool_status(ops, name)
        [ready] = body["status"]["conditions"]
        assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec"), ready
        assert ready["message"].startswith("spec.namespaceSelector: unable to parse"), ready
    finally:
        await ops.delete(clusteragentsessionpool.KIND, None, name)


@pytest.mark.parametrize(("selector", "field"), [
    ({"matchExpressions": [{"key": "a", "operator": "In"}]},
     "spec.namespaceSelector.matchExpressions[].values"),
    ({"matchExpressions": [{"key": "a", "operator": "Exists", "values": ["b"]}]},
     "spec.namespaceSelector.matchExpressions[].values"),
    ({"matchExpressions": [{"key": "a", "operator": "Near"}]},
     "spec.namespaceSelector.matchExpressions[0].operator"),
])
async def test_invalid_selectors_are_rejected_at_admission(ops, selector, field):
    with pytest.raises(ApiException) as refused:
        await ops.create(cluster_pool_manifest(f"bad-{os.urandom(3).hex()}", 1, selector))
    assert refused.value.status == 422 and field in refused.value.body, refused.value.body
