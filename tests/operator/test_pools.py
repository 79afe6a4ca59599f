"""AgentSessionPool on the cluster: members started ahead, claimed by new sessions of their template,
never shared, never returned, refilled at once."""

import asyncio
import os
import random

import pytest
from fixtures.polling import eventually
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from operator_harness import session_in_phase, session_manifest

from agentbox.crds import agentsession, agentsessionpool
from agentbox.operator import naming
from agentbox.operator.build.pool import is_pool_token
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY
from agentbox.operator.handlers import pool

pytestmark = pytest.mark.cluster
TEMPLATE = {"agent": {"runtime": "scripted"}}


def pool_manifest(name: str, namespace: str, replicas: int, template: dict | None = None) -> dict:
    return {"apiVersion": agentsessionpool.API_VERSION, "kind": agentsessionpool.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"replicas": replicas, "template": template or TEMPLATE}}


async def pool_status(ops, namespace: str, name: str, **wanted) -> dict:
    """The pool once its status says `wanted` (and was written for its current generation)."""
    async def probe():
        body = await ops.get(agentsessionpool.KIND, namespace, name)
        status = (body or {}).get("status") or {}
        current = status.get("observedGeneration") == body["metadata"]["generation"]
        return body if current and all(status.get(key) == value for key, value in wanted.items()) else None

    try:
        return await eventually(probe, timeout=60, what=f"pool {name} to report {wanted}")
    except AssertionError:
        body = await ops.get(agentsessionpool.KIND, namespace, name)
        raise AssertionError(f"pool {name}: {(body or {}).get('status')}") from None


async def members(ops, namespace: str, pool: str) -> dict[str, dict]:
    pods = await ops.list("Pod", namespace, f"{naming.POOL_LABEL}={pool}")
    return {pod["metadata"]["name"]: pod for pod in pods if not pod["metadata"].get("deletionTimestamp")}


async def claimed_running(ops, namespace: str, name: str) -> dict:
    body = await session_in_phase(ops, namespace, name, "Running", timeout=60)
    assert body["status"]["poolMember"], f"{name} started cold: {body['status']}"
    return body


async def test_a_session_takes_a_ready_member_and_the_pool_refills(operator, kube, ops, tenant):
    await ops.create(pool_manifest("warm", tenant, 2))
    await pool_status(ops, tenant, "warm", ready=2, replicas=2)
    before = await members(ops, tenant, "warm")
    assert len(before) == 2
    await ops.create(session_manifest("ada", tenant, **TEMPLATE, systemPrompt="you help Ada"))
    body = await claimed_running(ops, tenant, "ada")
    member = body["status"]["poolMember"]
    assert member in before and body["status"]["podName"] == member
    assert body["status"]["endpoint"] == naming.endpoint(member, tenant)
    conditions = {c["type"]: c["status"] for c in body["status"]["conditions"]}
    assert conditions["Ready"] == "True" and conditions["WorkspaceReady"] == "True"

    # Every child of the member is the session's now, and says so.
    for kind in ("Pod", "PersistentVolumeClaim", "ConfigMap", "Secret", "Service", "NetworkPolicy"):
        child = await ops.get(kind, tenant, member)
        assert child is not None, kind
        assert [ref["uid"] for ref in child["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]], kind
        labels = child["metadata"]["labels"]
        assert labels[naming.SESSION_LABEL] == "ada" and naming.POOL_LABEL not in labels, kind
    secret = await ops.get("Secret", tenant, member)
    assert not is_pool_token(secret["data"][RUNNER_TOKEN_KEY])  # re-issued for the session
    configmap = await ops.get("ConfigMap", tenant, member)
    assert configmap["data"]["system-prompt.md"] == "you help Ada"
    pod = await ops.get("Pod", tenant, member)
    assert pod["metadata"]["labels"][naming.CLAIMED_FROM_LABEL] == "warm"
    assert pod["metadata"]["uid"] == before[member]["metadata"]["uid"]  # the same pod: not restarted

    # Refilled with a new member; the claimed one is never the pool's again.
    await pool_status(ops, tenant, "warm", ready=2, replicas=2, claimed=1)
    after = await members(ops, tenant, "warm")
    assert member not in after and len(after) == 2

    async def claim_event():
        async with kube.api_client() as api:
            events = await client.CoreV1Api(api).list_namespaced_event(
                tenant, field_selector="involvedObject.name=ada")
        return [event for event in events.items if event.reason == "PoolMemberClaimed"]

    [event] = await eventually(claim_event, what="a PoolMemberClaimed event")
    assert member in event.message


async def test_deleting_a_claimed_session_deletes_its_pod_not_back_to_the_pool(operator, ops, tenant):
    await ops.create(pool_manifest("warm", tenant, 1))
    await pool_status(ops, tenant, "warm", ready=1)
    await ops.create(session_manifest("bob", tenant, **TEMPLATE))
    member = (await claimed_running(ops, tenant, "bob"))["status"]["poolMember"]
    await ops.delete(agentsession.KIND, tenant, "bob")

    async def gone():
        return all([await ops.get(kind, tenant, member) is None for kind in ("Pod", "ConfigMap", "Secret")])

    await eventually(gone, timeout=60, what="the claimed member to go with its session")
    assert member not in await members(ops, tenant, "warm")
    await pool_status(ops, tenant, "warm", ready=1, claimed=0)


async def test_another_template_workspace_or_tenant_starts_cold(operator, ops, tenant):
    other_tenant = f"t-op-{os.urandom(3).hex()}"
    await ops.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": other_tenant, "labels": {
        "agentbox.dev/tenant": other_tenant.removeprefix("t-"), "agentbox.dev/test-namespace": "true"}}})
    try:
        await ops.create(pool_manifest("warm", tenant, 1))
        await pool_status(ops, tenant, "warm", ready=1)
        ready_before = set(await members(ops, tenant, "warm"))
        await ops.create(session_manifest("gem", tenant, agent={"runtime": "scripted", "args": ["--other"]}))
        await ops.create(session_manifest("far", other_tenant, **TEMPLATE))
        # A member's workspace claim could not be resized to the session's.
        await ops.create(session_manifest("roomy", tenant, **TEMPLATE, workspace={"size": "2Gi"}))
        for namespace, name in ((tenant, "gem"), (other_tenant, "far"), (tenant, "roomy")):
            body = await session_in_phase(ops, namespace, name, "Running", timeout=60)
            assert body["status"].get("poolMember") is None
            assert body["status"]["podName"] == naming.child_name(name)
        roomy = await ops.get("PersistentVolumeClaim", tenant, naming.child_name("roomy"))
        assert roomy["spec"]["resources"]["requests"]["storage"] == "2Gi"
        assert set(await members(ops, tenant, "warm")) == ready_before  # untouched
    finally:
        await ops.delete("Namespace", None, other_tenant)


async def test_concurrent_sessions_never_share_a_member(operator, ops, tenant):
    await ops.create(pool_manifest("warm", tenant, 3))
    await pool_status(ops, tenant, "warm", ready=3)
    names = [f"s{i}" for i in range(6)]
    await asyncio.gather(*(ops.create(session_manifest(name, tenant, **TEMPLATE)) for name in names))
    bodies = [await session_in_phase(ops, tenant, name, "Running", timeout=90) for name in names]
    pods = [body["status"]["podName"] for body in bodies]
    assert len(set(pods)) == len(pods)
    warm = [body["status"]["poolMember"] for body in bodies if body["status"].get("poolMember")]
    assert len(warm) >= 3, [body["status"] for body in bodies]
    for body in bodies:
        pod = await ops.get("Pod", tenant, body["status"]["podName"])
        assert [ref["uid"] for ref in pod["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]]
    await pool_status(ops, tenant, "warm", ready=3, claimed=len(warm))


async def test_a_template_change_replaces_the_unclaimed_members_only(operator, ops, tenant):
    await ops.create(pool_manifest("warm", tenant, 2))
    first = await pool_status(ops, tenant, "warm", ready=2)
    await ops.create(session_manifest("kept", tenant, **TEMPLATE))
    kept = (await claimed_running(ops, tenant, "kept"))["status"]["poolMember"]
    await ops.merge_patch(agentsessionpool.KIND, tenant, "warm",
                          {"spec": {"template": {"agent": {"runtime": "scripted", "model": "small"}}}})

    async def replaced():
        body = await ops.get(agentsessionpool.KIND, tenant, "warm")
        status = body.get("status") or {}
        current = await members(ops, tenant, "warm")
        hashes = {pod["metadata"]["labels"][naming.TEMPLATE_HASH_LABEL] for pod in current.values()}
        fresh = status.get("templateHash") != first["status"]["templateHash"]
        return fresh and status.get("ready") == 2 and hashes == {status["templateHash"]} and len(current) == 2

    await eventually(replaced, timeout=60, what="members of the new template only")
    assert (await ops.get("Pod", tenant, kept))["metadata"]["labels"][naming.SESSION_LABEL] == "kept"
    # A session of the old template now starts cold; one of the new template is served warm.
    await ops.create(session_manifest("old", tenant, **TEMPLATE))
    await ops.create(session_manifest("new", tenant, agent={"runtime": "scripted", "model": "small"}))
    old = await session_in_phase(ops, tenant, "old", "Running", timeout=60)
    assert old["status"].get("poolMember") is None
    await claimed_running(ops, tenant, "new")


async def test_an_interrupted_claim_is_finished_or_given_up_on_restart(operator, ops, tenant):
    """A pass that named a member on the session and died before the handover: the next pass hands that
    member over, or starts cold when another session holds it by then."""
    await ops.create(pool_manifest("warm", tenant, 2))
    await pool_status(ops, tenant, "warm", ready=2)
    first = sorted(await members(ops, tenant, "warm"))[0]
    noted = session_manifest("noted", tenant, **TEMPLATE)
    noted["metadata"]["annotations"] = {naming.POOL_MEMBER_ANNOTATION: first}
    await ops.create(noted)
    assert (await claimed_running(ops, tenant, "noted"))["status"]["poolMember"] == first
    await ops.create(session_manifest("holder", tenant, **TEMPLATE))
    held = (await claimed_running(ops, tenant, "holder"))["status"]["poolMember"]
    late = session_manifest("late", tenant, **TEMPLATE)
    late["metadata"]["annotations"] = {naming.POOL_MEMBER_ANNOTATION: held}
    await ops.create(late)
    body = await session_in_phase(ops, tenant, "late", "Running", timeout=60)
    assert body["status"].get("poolMember") != held and body["status"]["podName"] != held  # another, or cold
    pod = await ops.get("Pod", tenant, held)
    assert pod["metadata"]["labels"][naming.SESSION_LABEL] == "holder"


async def test_kubectl_scale_to_zero_empties_the_pool(operator, ops, tenant):
    await ops.create(pool_manifest("warm", tenant, 2))
    await pool_status(ops, tenant, "warm", ready=2)
    await ops.merge_patch(agentsessionpool.KIND, tenant, "warm", {"spec": {"replicas": 0}}, sub="scale")
    await pool_status(ops, tenant, "warm", ready=0, replicas=0)
    await eventually(lambda: _no_members(ops, tenant), timeout=60, what="the members to go")


async def _no_members(ops, namespace):
    return not await members(ops, namespace, "warm")


@pytest.mark.parametrize(("spec", "field"), [
    ({"replicas": 51}, "spec.replicas"),
    ({"replicas": -1}, "spec.replicas"),
    ({"template": {"agent": {"runtime": "cobol"}}}, "spec.template.agent.runtime"),
    ({"template": {"agent": {"runtime": "custom"}}}, "spec.agent.command"),
])
async def test_invalid_pools_are_rejected_at_admission(ops, namespace, spec, field):
    manifest = pool_manifest("bad", namespace, 1)
    manifest["spec"].update(spec)
    with pytest.raises(ApiException) as refused:
        await ops.create(manifest)
    assert refused.value.status == 422 and field in refused.value.body


async def test_a_member_the_quota_refuses_is_reported_on_the_pool(operator, kube, ops, tenant):
    """The tenant baseline caps a container's CPU limit (LimitRange) and the namespace's (quota): a template
    asking 100 cores cannot start a member, and the pool says why (condition and Event) instead of
    retrying in silence."""
    template = {"agent": {"runtime": "scripted"},
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"cpu": "100"}}}
    await ops.create(pool_manifest("big", tenant, 1, template))

    async def refused():
        body = await ops.get(agentsessionpool.KIND, tenant, "big")
        conditions = {c["type"]: c for c in ((body or {}).get("status") or {}).get("conditions") or []}
        ready = conditions.get("Ready") or {}
        return ready if ready.get("reason") == "MemberRejected" else None

    ready = await eventually(refused, timeout=60, what="the pool to report its refused member")
    assert ready["status"] == "False" and "cpu" in ready["message"], ready
    assert await members(ops, tenant, "big") == {}

    async def event():
        async with kube.api_client() as api:
            listing = await client.CoreV1Api(api).list_namespaced_event(
                tenant, field_selector=f"involvedObject.kind={agentsessionpool.KIND},involvedObject.name=big")
        return [item for item in listing.items if item.reason == "MemberRejected"]

    await eventually(event, what="a MemberRejected event on the pool")


def _stray_of(child: dict, name: str) -> dict:
    """A copy of a member's child under another name: what a start leaves when the operator dies before
    the member's pod."""
    meta = child["metadata"]
    manifest = {key: value for key, value in child.items() if key not in ("metadata", "status")}
    manifest["metadata"] = {"name": name, "namespace": meta["namespace"], "labels": meta["labels"],
                            "ownerReferences": meta["ownerReferences"]}
    if child["kind"] == "PersistentVolumeClaim":
        manifest["spec"] = {key: value for key, value in child["spec"].items() if key != "volumeName"}
    return manifest


async def test_children_of_a_member_with_no_pod_are_deleted(operator, ops, tenant):
    """The operator died between a member's children and its pod, and someone deleted another member's pod
    while it was down: once restarted, the pool deletes both members' children and starts replacements."""
    await ops.create(pool_manifest("warm", tenant, 2))
    await pool_status(ops, tenant, "warm", ready=2, replicas=2)
    kept, lost = sorted(await members(ops, tenant, "warm"))
    operator.kill()
    try:
        stray = f"{lost}-stray"
        for kind in ("PersistentVolumeClaim", "ConfigMap", "Secret"):
            child = await ops.get(kind, tenant, lost)
            child["kind"] = kind
            await ops.create(_stray_of(child, stray))
        await ops.delete("Pod", tenant, lost)
        await asyncio.sleep(pool.ORPHAN_GRACE_SECONDS)  # no younger than the grace a start is given
    finally:
        operator.start()
        await operator.wait_alive()

    async def gone():
        left = [(kind, name) for kind in ("PersistentVolumeClaim", "ConfigMap", "Secret")
                for name in (stray, lost) if await _present(ops, kind, tenant, name)]
        return not left or None

    await eventually(gone, timeout=60, what="the podless members' children to go")
    for kind in ("Pod", "PersistentVolumeClaim", "ConfigMap", "Secret"):
        assert await _present(ops, kind, tenant, kept), f"{kind} {kept} of a member with its pod"
    await pool_status(ops, tenant, "warm", ready=2, replicas=2)
    assert kept in await members(ops, tenant, "warm")


async def _present(ops, kind: str, namespace: str, name: str) -> bool:
    body = await ops.get(kind, namespace, name)
    return body is not None and not body["metadata"].get("deletionTimestamp")


async def test_sigkill_during_claims_converges(operator, ops, tenant):
    """The operator SIGKILLed at random points while 20 sessions claim from a pool of 5: every session
    runs in a pod of its own, the pool is back to 5 unclaimed members, and no member's children outlive
    its pod."""
    rng = random.Random(1405)
    small = {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "50m", "memory": "64Mi"}}
    template = {**TEMPLATE, "resources": small}  # 25 pods within the tenant's default quota
    await ops.create(pool_manifest("warm", tenant, 5, template))
    await pool_status(ops, tenant, "warm", ready=5)
    names = [f"claim-{index:02d}" for index in range(20)]

    async def create_all():
        for name in names:
            await ops.create(session_manifest(name, tenant, **template))
            await asyncio.sleep(rng.uniform(0, 0.2))

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

    bodies = [await session_in_phase(ops, tenant, name, "Running", timeout=120) for name in names]
    pods = [body["status"]["podName"] for body in bodies]
    assert len(set(pods)) == len(pods), pods
    assert any(body["status"].get("poolMember") for body in bodies)
    for body in bodies:
        pod = await ops.get("Pod", tenant, body["status"]["podName"])
        assert [ref["uid"] for ref in pod["metadata"]["ownerReferences"]] == [body["metadata"]["uid"]]
        assert naming.POOL_LABEL not in pod["metadata"]["labels"]
    # One pod and one workspace each: a pass cut short after starting cold never claims a member beside it.
    for kind in ("Pod", "PersistentVolumeClaim"):
        owners = [item["metadata"]["labels"][naming.SESSION_LABEL] for item in await ops.list(
            kind, tenant, naming.SESSION_LABEL) if not item["metadata"].get("deletionTimestamp")]
        assert sorted(owners) == sorted(names), f"{kind}: {sorted(owners)}"

    async def settled():
        unclaimed = await members(ops, tenant, "warm")
        children = {kind: {item["metadata"]["name"] for item in await ops.list(
            kind, tenant, f"{naming.POOL_LABEL}=warm") if not item["metadata"].get("deletionTimestamp")}
            for kind in ("PersistentVolumeClaim", "ConfigMap", "Secret")}
        return (len(unclaimed) == 5 and all(names == set(unclaimed) for names in children.values())) or None

    try:
        await eventually(settled, timeout=90, interval=1, what="5 unclaimed members, each with its children")
    except AssertionError as failure:
        raise AssertionError(f"{failure} (the operator's log: {operator.log_path})") from None
    await pool_status(ops, tenant, "warm", ready=5, replicas=5)
