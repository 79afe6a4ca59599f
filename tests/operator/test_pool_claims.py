"""Pool workers and claims without a cluster: a fake apiserver that keeps resourceVersions and honours
their preconditions, so each race between a claim and a pool's worker can be staged step by step."""

import asyncio
import copy
import itertools
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import kopf
import pytest
from kopf._core.engines import posting  # kopf's Event context, which only a running operator sets
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.crds import agentsessionpool
from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.operator import naming
from agentbox.operator.build.common import Session
from agentbox.operator.build.pod import template_hash
from agentbox.operator.handlers import pool
from agentbox.operator.rendering import Rendering, render
from agentbox.operator.settings import OperatorSettings

NAMESPACE = "tenant-acme"
POOL = "warm"
KEY = (NAMESPACE, POOL)
TEMPLATE = {"agent": {"runtime": "scripted"}}
SETTINGS = OperatorSettings()


def _conflict(message: str) -> ApiException:
    error = ApiException(status=409, reason="Conflict")
    error.body = json.dumps({"kind": "Status", "message": message})
    return error


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


class FakeKube:
    """Objects by (kind, namespace, name), each write a new resourceVersion. `before_list` runs after a
    list's snapshot is taken and before it is returned: what happens while a survey's list is in flight."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.versions = itertools.count(100)
        self.uids = itertools.count(1)
        self.before_list: Callable[[], Any] | None = None

    def _written(self, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        meta = body["metadata"]
        meta["resourceVersion"] = str(next(self.versions))
        self.objects[(kind, meta["namespace"], meta["name"])] = body
        return copy.deepcopy(body)

    def stored(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.objects.get((kind, NAMESPACE, name))

    def update(self, kind: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """A write by someone else (the kubelet, another session): a new version."""
        body = self.objects[(kind, NAMESPACE, name)]
        _merge(body, patch)
        return self._written(kind, body)

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        if kind == "Namespace":
            return {"metadata": {"name": name, "labels": {naming.TENANT_LABEL: "acme"}}}
        return copy.deepcopy(self.objects.get((kind, namespace or "", name)))

    async def listing(self, kind: str, namespace: str | None, label_selector: str = "") -> dict[str, Any]:
        wanted = dict(term.split("=") for term in label_selector.split(",") if term)
        items = [copy.deepcopy(body) for (stored_kind, where, _), body in self.objects.items()
                 if stored_kind == kind and where == namespace
                 and all((body["metadata"].get("labels") or {}).get(k) == v for k, v in wanted.items())]
        listed = {"metadata": {"resourceVersion": str(next(self.versions))}, "items": items}
        if self.before_list is not None:
            self.before_list()
        return listed

    async def list(self, kind: str, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]:
        return (await self.listing(kind, namespace, label_selector))["items"]

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        existing = self.objects.get((manifest["kind"], meta["namespace"], meta["name"]))
        body = copy.deepcopy(manifest)
        if existing is not None:
            body["metadata"] = {**existing["metadata"], **body["metadata"]}
            body["status"] = existing.get("status")
        else:
            body["metadata"].update(uid=f"uid-{next(self.uids)}", creationTimestamp=_now())
        return self._written(manifest["kind"], body)

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        meta = manifest["metadata"]
        if (manifest["kind"], meta["namespace"], meta["name"]) in self.objects:
            return None
        return await self.apply(manifest)

    async def merge_patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                          sub: str | None = None) -> dict[str, Any] | None:
        body = self.objects.get((kind, namespace or "", name))
        if body is None:
            return None
        wanted = patch.get("metadata", {}).get("resourceVersion")
        if wanted is not None and wanted != body["metadata"]["resourceVersion"]:
            raise _conflict("the object has been modified")
        _merge(body, {**patch, "metadata": {k: v for k, v in patch.get("metadata", {}).items()
                                            if k != "resourceVersion"}})
        return self._written(kind, body)

    def _delete(self, kind: str, namespace: str, name: str, preconditions: dict[str, str]) -> None:
        body = self.objects.get((kind, namespace, name))
        if body is None:
            error = ApiException(status=404, reason="Not Found")
            error.body = "{}"
            raise error
        if any(body["metadata"].get(field) != value for field, value in preconditions.items()):
            raise _conflict(f"Precondition failed: {preconditions}")
        del self.objects[(kind, namespace, name)]

    async def delete(self, kind: str, namespace: str | None, name: str, uid: str | None = None,
                     resource_version: str | None = None) -> bool:
        preconditions = {key: value for key, value in (("uid", uid), ("resourceVersion", resource_version))
                         if value}
        try:
            self._delete(kind, namespace or "", name, preconditions)
        except ApiException as error:
            if error.status == 409 and resource_version is not None:
                raise
            return False
        return True


class AlwaysActive:
    async def active(self, namespace: str) -> bool:
        return True


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.fixture
def kube():
    quiet = kopf.OperatorSettings()
    quiet.posting.enabled, quiet.posting.level = False, logging.CRITICAL + 1
    posting.settings_var.set(quiet)
    fake = FakeKube()
    yield fake
    for worker in pool._workers.values():
        worker.task.cancel()
    pool._workers.clear()
    pool._pools.clear()
    pool._members.clear()
    pool._claiming.clear()


def pool_body(replicas: int, template: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"apiVersion": agentsessionpool.API_VERSION, "kind": agentsessionpool.KIND,
            "metadata": {"name": POOL, "namespace": NAMESPACE, "uid": "pool-uid", "generation": 1,
                         "resourceVersion": "1"},
            "spec": {"replicas": replicas, "template": template or TEMPLATE}}


async def start_pool(kube: FakeKube, replicas: int, template: dict[str, Any] | None = None) -> None:
    """The pool's worker starts its members; the kubelet runs them (watch events included)."""
    body = pool_body(replicas, template)
    pool._pools[KEY] = body
    pool._workers[KEY] = pool.PoolWorker(kube, SETTINGS, AlwaysActive(), KEY)
    for _ in range(100):
        if len(member_pods(kube)) == replicas:
            break
        await asyncio.sleep(0.05)
    for pod in member_pods(kube):
        run(kube, pod["metadata"]["name"])


def run(kube: FakeKube, name: str) -> dict[str, Any]:
    running = kube.update("Pod", name, {"status": {"phase": "Running"}})
    pool._remember(running)
    return running


def member_pods(kube: FakeKube) -> list[dict[str, Any]]:
    return [body for (kind, _, _), body in kube.objects.items()
            if kind == "Pod" and (body["metadata"].get("labels") or {}).get(naming.POOL_LABEL) == POOL]


def session(name: str, **spec: Any) -> Session:
    body = {**TEMPLATE, "tenant": {"org": "acme", "user": "ada@example.com"}, **spec}
    return Session(name, NAMESPACE, f"uid-{name}", AgentSessionSpec.model_validate(body))


async def claim(kube: FakeKube, who: Session) -> str | None:
    """session.py's claim: the session's template_hash, its children under the member's name."""
    rendering: Rendering = await render(kube, SETTINGS, NAMESPACE, who.spec)

    def as_member(member: str, token: str | None):
        claimant = Session(who.name, who.namespace, who.uid, who.spec, member=member)
        children = rendering.children(claimant, token or "dG9rZW4=")
        return children, rendering.pod(claimant, children)

    async def note(member: str) -> None:
        pass

    own = rendering.children(who, "dG9rZW4=")
    wanted = template_hash(rendering.pod(who, own), own["ConfigMap"], own["Secret"])
    claimed = await pool.claim(kube, who, wanted, note, as_member)
    return None if claimed is None else claimed[0]


@pytest.mark.parametrize("workspace", [{"size": "10Gi"}, {"storageClassName": "fast"}])
async def test_a_session_whose_workspace_the_member_lacks_starts_cold(kube, workspace):
    """A claim cannot resize a member's workspace claim or change its class (the apiserver refuses the
    apply, with the pod already the session's): such a session starts cold, and leaves the member be."""
    await start_pool(kube, 1)
    assert await claim(kube, session("big", workspace=workspace)) is None
    assert all(naming.POOL_LABEL in pod["metadata"]["labels"] for pod in member_pods(kube))
    assert await claim(kube, session("plain", workspace={"retainOnDelete": True})) is not None


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(100):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never: {what}")


def claimed_elsewhere(kube: FakeKube, name: str) -> dict[str, Any]:
    """Another session's handover (another replica's, or one the watch has not told of yet): the
    member's children carry its labels now. The pod as patched."""
    labels = {naming.POOL_LABEL: None, naming.TEMPLATE_HASH_LABEL: None, naming.CLAIMED_FROM_LABEL: POOL,
              naming.SESSION_LABEL: "other"}
    for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim"):
        kube.update(kind, name, {"metadata": {"labels": labels}})
    return kube.update("Pod", name, {"metadata": {"labels": labels}})


async def scale(kube: FakeKube, replicas: int) -> None:
    pool._pools[KEY] = pool_body(replicas)
    pool._workers[KEY].wake()
    await asyncio.sleep(pool.COALESCE_SECONDS + 0.2)  # one pass


async def test_a_member_being_claimed_is_not_deleted_as_surplus(kube):
    await start_pool(kube, 2)
    taken, spare = sorted(pod["metadata"]["name"] for pod in member_pods(kube))
    pool._claiming.add((NAMESPACE, taken))
    await scale(kube, 0)
    assert kube.stored("Pod", spare) is None
    assert kube.stored("Pod", taken) is not None and kube.stored("Secret", taken) is not None


async def test_a_member_claimed_since_the_index_saw_it_is_left_to_its_session(kube):
    await start_pool(kube, 1)
    [name] = [pod["metadata"]["name"] for pod in member_pods(kube)]
    claimed_elsewhere(kube, name)
    await scale(kube, 0)  # the index still has it unclaimed: surplus
    for kind in ("Pod", "ConfigMap", "Secret", "PersistentVolumeClaim"):
        assert kube.stored(kind, name)["metadata"]["labels"][naming.SESSION_LABEL] == "other", kind


async def test_a_member_claimed_while_a_survey_lists_stays_claimed(kube):
    await start_pool(kube, 1)
    [name] = [pod["metadata"]["name"] for pod in member_pods(kube)]
    older = copy.deepcopy(kube.stored("Pod", name))

    def claim_once() -> None:  # the handover lands between the list and the survey's use of it
        kube.before_list = None
        pool._remember(claimed_elsewhere(kube, name))

    kube.before_list = claim_once
    worker = pool._workers[KEY]
    worker._next_survey = 0.0
    worker.wake()
    members = pool._members[KEY]
    await until(lambda: kube.before_list is None and len(member_pods(kube)) == 1, "a survey and a refill")
    assert name not in members.unclaimed and name in members.claimed
    pool._remember(older)  # a watch event from before the handover, late
    assert name not in members.unclaimed and name in members.claimed


async def test_a_claim_takes_a_member_whose_pod_changed_since_the_index_saw_it(kube):
    await start_pool(kube, 1)
    [name] = [pod["metadata"]["name"] for pod in member_pods(kube)]
    kube.update("Pod", name, {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})  # unseen
    assert await claim(kube, session("ada")) == name
    assert kube.stored("Pod", name)["metadata"]["labels"][naming.SESSION_LABEL] == "ada"


async def test_a_member_another_session_took_is_not_tried_again(kube):
    await start_pool(kube, 1)
    [name] = [pod["metadata"]["name"] for pod in member_pods(kube)]
    claimed_elsewhere(kube, name)
    assert await claim(kube, session("ada")) is None
    assert name in pool._members[KEY].claimed and name not in pool._members[KEY].unclaimed
