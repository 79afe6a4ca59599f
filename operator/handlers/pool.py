"""AgentSessionPool: keep `replicas` unclaimed members of the pool's template, and hand one to a new session
whose pod would be the same (`claim`, called from the session's first reconcile).

Each pool has one worker task (not a kopf daemon: a daemon puts a finalizer on its object) that wakes on
the pool's and its members' watch events, coalesces them, and creates or deletes members. Members are
known from the watch of agentbox pods, plus the worker's own creations, which reach the index before
their watch events do: a burst of claims never starts twice the members it needs.
"""

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from agentbox.crds import agentsessionpool
from agentbox.crds.agentsessionpool import AgentSessionPoolSpec
from agentbox.crds.conditions import ConditionStatus, Reason
from agentbox.operator import metrics, naming
from agentbox.operator.build.common import Session
from agentbox.operator.build.pod import member_hash, template_hash
from agentbox.operator.build.pool import (
    MEMBER_KINDS,
    handover,
    is_pool_token,
    member_name,
    member_session,
    owned_by_pool,
    pool_token,
)
from agentbox.operator.build.pvc import build_pvc
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY
from agentbox.operator.kube import Kube, api_message, resource_version
from agentbox.operator.leadership import Leadership
from agentbox.operator.rendering import Rendering, render
from agentbox.operator.settings import OperatorSettings
from agentbox.operator.status import format_time

GROUP, VERSION, PLURAL = agentsessionpool.GROUP, agentsessionpool.VERSION, agentsessionpool.PLURAL
log = logging.getLogger(__name__)
START_BATCH = 4  # members started at once
# A refill starts at once, paced beside claims: a member's start costs the cluster about what a cold
# session does, so while sessions are claiming members (one in the last CLAIMS_QUIET_SECONDS) a pool starts
# one member at a time, at most one per PACE_BESIDE_CLAIMS; else START_BATCH at a time. (Measured at 10
# claims/s on two cores: starting 4 at a time beside them took the claims' p99 from 110 ms to 400-650 ms.)
CLAIMS_QUIET_SECONDS = 2.0
PACE_BESIDE_CLAIMS = 0.5
PACE_POLL_SECONDS = 0.1
RESYNC_SECONDS = 30.0  # a worker looks again this often with no event (a lost watch event, a refused create)
# A worker lists its members afresh this often (and when it starts or resumes after a pause): the index
# heals from missed watch events, and a member's children whose pod never came (the operator died between
# them) or went (someone deleted it) are deleted once they are older than ORPHAN_GRACE_SECONDS (a member's
# pod follows its children within a second or two).
SURVEY_SECONDS = 60.0
ORPHAN_GRACE_SECONDS = 10.0
RETRY_SECONDS = 5.0
# A pass waits this long after the event that woke it: a burst of claims and of members' pod events (a
# pod's start is several) makes one pass and one status write, not one each.
COALESCE_SECONDS = 0.1
STARTING = (Reason.MEMBERS_STARTING, Reason.POOLS_STARTING)  # no Event for these: every claim brings one
CLAIM_ATTEMPTS = 3  # ready members tried before a session starts cold (each lost race costs one patch)


@dataclass
class Members:
    """What the operator knows of one pool's pods (key: namespace, the pool's label value)."""

    unclaimed: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> newest pod seen
    claimed: set[str] = field(default_factory=set)  # claimed pods still there
    # name -> resourceVersion of the newest event, write or read of each pod, deleted ones too: a version
    # older than that (a watch event behind our own handover, a survey's list taken before it) changes
    # nothing, so a claimed or deleted member never comes back as unclaimed.
    seen: dict[str, int] = field(default_factory=dict)


_members: defaultdict[tuple[str, str], Members] = defaultdict(Members)
_pools: dict[tuple[str, str], dict[str, Any]] = {}  # (namespace, label value) -> newest pool body
_workers: dict[tuple[str, str], "PoolWorker"] = {}


def _age(body: dict[str, Any], now: datetime) -> float:
    created = body["metadata"].get("creationTimestamp")
    return (now - datetime.fromisoformat(created)).total_seconds() if created else 0.0


def _ready(pod: dict[str, Any]) -> bool:
    """A member a session may take: running and not going away. Its runner waits for the claim, so Ready
    (the agent accepts messages) comes after the handover."""
    running = (pod.get("status") or {}).get("phase") == "Running"
    return running and not pod["metadata"].get("deletionTimestamp")


def _of_template(pod: dict[str, Any], wanted: str) -> bool:
    return (pod["metadata"].get("labels") or {}).get(naming.TEMPLATE_HASH_LABEL) == wanted


def _dead(pod: dict[str, Any]) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")


def _key(pool: dict[str, Any]) -> tuple[str, str]:
    return pool["metadata"]["namespace"], naming.label_value(pool["metadata"]["name"])


class PoolWorker:
    def __init__(self, kube: Kube, settings: OperatorSettings, leadership: Leadership,
                 key: tuple[str, str]) -> None:
        self.kube, self.settings, self.leadership, self.key = kube, settings, leadership, key
        self._wake = asyncio.Event()
        self._next_survey = 0.0  # time.monotonic() when the members are listed next
        self._org: str | None = None
        self._last_start = 0.0  # time.monotonic() of the latest member start
        self.task = asyncio.create_task(self._run(), name=f"pool-{key[0]}-{key[1]}")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        self._wake.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESYNC_SECONDS)
            await asyncio.sleep(COALESCE_SECONDS)
            self._wake.clear()
            pool = _pools.get(self.key)
            if pool is None:
                return
            try:
                if not await self.leadership.active(self.key[0]):
                    self._next_survey = 0.0  # kopf's watch missed what happened meanwhile
                    continue
                async with metrics.reconciling("agentsessionpool"):
                    await self._reconcile(pool)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                why = f"{error.status}: {error.reason}" if isinstance(error, ApiException) else repr(error)
                log.warning("pool %s/%s: %s; again in %.0f s", *self.key, why, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                self._wake.set()

    async def _survey(self) -> None:
        """List the pool's pods afresh into the index, and delete the children of members with no pod."""
        namespace, label = self.key
        listing = await self.kube.listing("Pod", namespace, f"{naming.MANAGED_BY}={naming.MANAGER}")
        pods = listing.get("items") or []
        listed_at = resource_version(listing)
        members = _members[self.key]
        # What the watch or a claim told of after the list was taken stays (a newer version than the
        # list's, the pod's state then); the rest is as listed, and what the list no longer has is gone.
        seen = {name: version for name, version in members.seen.items() if version > listed_at}
        unclaimed = {name: pod for name, pod in members.unclaimed.items() if name in seen}
        claimed = {name for name in members.claimed if name in seen}
        for pod in pods:
            name, labels = pod["metadata"]["name"], pod["metadata"].get("labels") or {}
            if name in seen:
                continue
            if labels.get(naming.POOL_LABEL) == label:
                unclaimed[name] = pod
            elif labels.get(naming.CLAIMED_FROM_LABEL) == label:
                claimed.add(name)
            else:
                continue
            seen[name] = resource_version(pod)
        members.unclaimed, members.claimed, members.seen = unclaimed, claimed, seen
        pod_names = {pod["metadata"]["name"] for pod in pods}
        # A member's workspace claim is made before its ConfigMap and Secret (_start_member): the claims
        # with no pod find every orphan, with no need to list Secrets (the operator may not).
        workspaces = await self.kube.list("PersistentVolumeClaim", namespace, f"{naming.POOL_LABEL}={label}")
        now = datetime.now(UTC)
        podless = [(workspace["metadata"], _age(workspace, now)) for workspace in workspaces
                   if workspace["metadata"]["name"] not in pod_names]
        await asyncio.gather(*(self._delete_orphan(meta) for meta, age in podless
                               if age > ORPHAN_GRACE_SECONDS))
        # One too young to tell is looked at again once it is not.
        again = min([SURVEY_SECONDS, *(ORPHAN_GRACE_SECONDS - age + 1 for _, age in podless
                                       if age <= ORPHAN_GRACE_SECONDS)])
        if self._org is None:
            namespace_body = await self.kube.get("Namespace", None, namespace) or {}
            labels = (namespace_body.get("metadata") or {}).get("labels") or {}
            self._org = labels.get(naming.TENANT_LABEL) or namespace.removeprefix("tenant-")
        self._next_survey = time.monotonic() + again
        if again < SURVEY_SECONDS:
            self._wake_later(again)

    async def _delete_orphan(self, workspace: dict[str, Any]) -> None:
        """Delete the children of a member whose pod never came or went (`workspace`: its claim's
        metadata)."""
        namespace, label = self.key
        name = workspace["name"]
        log.info("pool %s/%s: deleting the children of member %s, which has no pod", namespace, label, name)
        await self._delete_children(name)

    async def _delete_children(self, name: str) -> None:
        """Delete a member's ConfigMap, Secret and workspace claim, each only while it is still the
        pool's: a session that claimed the member has them under the same name."""
        namespace, label = self.key

        async def delete(kind: str) -> None:
            meta = ((await self.kube.get(kind, namespace, name)) or {}).get("metadata") or {}
            if (meta.get("labels") or {}).get(naming.POOL_LABEL) == label:
                await self.kube.delete(kind, namespace, name, uid=meta["uid"])

        await asyncio.gather(*(delete(kind) for kind in MEMBER_KINDS if kind != "Pod"))

    async def _reconcile(self, pool: dict[str, Any]) -> None:
        if time.monotonic() >= self._next_survey:
            await self._survey()
        try:
            spec = AgentSessionPoolSpec.model_validate(pool.get("spec") or {})
        except ValidationError as error:  # admission rejects this; an older CRD might not have
            await self._write_status(pool, {"conditions": [ready_condition(
                pool, False, Reason.INVALID_SPEC, str(error)[:1000])]})
            return
        assert self._org is not None
        model = member_session(pool, spec.template, "template", self._org)
        rendering = await render(self.kube, self.settings, model.namespace, model.spec)
        children = rendering.children(model, pool_token())
        wanted = member_hash(template_hash(rendering.pod(model, children), children["ConfigMap"],
                                           children["Secret"]), children["PersistentVolumeClaim"])
        members = _members[self.key]
        current = {name: pod for name, pod in members.unclaimed.items()
                   if _of_template(pod, wanted) and not _dead(pod)
                   and not pod["metadata"].get("deletionTimestamp")}
        # A member a session here is claiming is the session's by the time a delete would land.
        deletable = [pod for name, pod in members.unclaimed.items() if (self.key[0], name) not in _claiming
                     and not pod["metadata"].get("deletionTimestamp")]
        stale = [pod for pod in deletable if pod["metadata"]["name"] not in current]
        surplus = sorted((pod for pod in deletable if pod["metadata"]["name"] in current),
                         key=lambda pod: (_ready(pod), pod["metadata"]["name"]))[
            :max(0, len(current) - spec.replicas)]  # starting ones go first
        for pod in surplus:
            del current[pod["metadata"]["name"]]
        await asyncio.gather(*(self._delete_member(pod) for pod in [*stale, *surplus]))
        rejected = None
        missing = spec.replicas - len(current) if not rendering.key_missing else 0
        if missing > 0:
            rejected = await self._start(pool, spec, rendering, wanted, missing)
        ready = sum(1 for pod in current.values() if _ready(pod))
        metrics.POOL_READY.labels(namespace=self.key[0], pool=pool["metadata"]["name"]).set(ready)
        if rendering.key_missing:
            condition = ready_condition(pool, False, Reason.PROVIDER_KEY_NOT_FOUND, rendering.key_missing)
        elif rejected:
            condition = ready_condition(pool, False, Reason.MEMBER_REJECTED, rejected)
        elif ready >= spec.replicas:
            condition = ready_condition(pool, True, Reason.MEMBERS_READY, f"{ready} members ready")
        else:
            condition = ready_condition(pool, False, Reason.MEMBERS_STARTING,
                                         f"{ready} of {spec.replicas} members ready")
        await self._write_status(pool, {
            "replicas": len(current), "ready": ready, "claimed": len(members.claimed), "templateHash": wanted,
            "observedGeneration": pool["metadata"].get("generation"), "conditions": [condition]})

    async def _start(self, pool: dict[str, Any], spec: AgentSessionPoolSpec, rendering: Rendering,
                     wanted: str, count: int) -> str | None:
        """Start `count` members, START_BATCH at a time; the apiserver's refusal, if any."""
        gate = asyncio.Semaphore(START_BATCH)
        refusals: list[str] = []

        async def one() -> None:
            async with gate:
                await self._pace(wanted)
                if refusals or not await self.leadership.active(self.key[0]):
                    return
                try:
                    await self._start_member(pool, spec, rendering, wanted)
                except ApiException as error:
                    if error.status not in (403, 422):
                        raise
                    refusals.append(api_message(error))

        await asyncio.gather(*(one() for _ in range(count)))
        if refusals:
            self._wake_later(RETRY_SECONDS)
        return refusals[0] if refusals else None

    async def _pace(self, wanted: str) -> None:
        """While sessions are claiming members, start one member at a time, each once the one before runs
        and PACE_BESIDE_CLAIMS after it started."""
        def held_back() -> bool:
            starting = any(_of_template(pod, wanted) and not _ready(pod) and not _dead(pod)
                           for pod in _members[self.key].unclaimed.values())
            return starting or time.monotonic() < self._last_start + PACE_BESIDE_CLAIMS

        # A poll: what ends the wait (time passing, a member running) has no one event to wait on.
        while _claiming_lately() and held_back():  # noqa: ASYNC110
            await asyncio.sleep(PACE_POLL_SECONDS)
        self._last_start = time.monotonic()

    async def _start_member(self, pool: dict[str, Any], spec: AgentSessionPoolSpec, rendering: Rendering,
                            wanted: str) -> None:
        assert self._org is not None
        name = member_name(pool["metadata"]["name"])
        session = member_session(pool, spec.template, name, self._org)
        children = rendering.children(session, pool_token())
        pod = owned_by_pool(rendering.pod(session, children), pool, wanted)
        workspace, *configuration = (owned_by_pool(children[kind], pool, wanted)
                                     for kind in ("PersistentVolumeClaim", "ConfigMap", "Secret"))
        # Applied, not created: the session that claims the member applies its own versions with the same
        # field manager, and the pool's labels and owner go with that apply. The claim comes first: a
        # survey finds a member that never got its pod by its claim.
        await self.kube.apply(workspace)
        await asyncio.gather(*(self.kube.apply(manifest) for manifest in configuration))
        created = await self.kube.create(pod)
        if created is not None:
            _remember(created)

    async def _delete_member(self, pod: dict[str, Any]) -> None:
        """Delete an unclaimed member: its pod on the version the index holds (a claim in another process,
        or one that patched it since, makes that fail), then its other children while still the pool's."""
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            await self.kube.delete("Pod", namespace, name, uid=meta["uid"],
                                   resource_version=meta["resourceVersion"])
        except ApiException as error:
            if error.status == 409:  # changed since: its watch event wakes the worker to judge it again
                return
            raise
        _members[self.key].unclaimed.pop(name, None)
        await self._delete_children(name)

    def _wake_later(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(delay, self.wake)

    async def _write_status(self, pool: dict[str, Any], status: dict[str, Any]) -> None:
        written = await write_status(self.kube, pool, status)
        known = _pools.get(self.key)
        if written is not None and (known is None or resource_version(written) >= resource_version(known)):
            _pools[self.key] = written


async def write_status(kube: Kube, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any] | None:
    """Write a pool's status unless it says what it says already: the object as written, or None. A Ready
    condition's transition time is kept while its status holds, and a new reason posts an Event (but
    members or pools starting, which follows every claim)."""
    previous = body.get("status") or {}
    before = {c["type"]: c for c in previous.get("conditions") or []}
    for condition in status.get("conditions") or []:
        old = before.get(condition["type"]) or {}
        if old.get("status") == condition["status"]:
            condition["lastTransitionTime"] = old.get("lastTransitionTime")
        if old.get("reason") != condition["reason"] and condition["reason"] not in STARTING:
            post = kopf.info if condition["status"] == ConditionStatus.TRUE else kopf.warn
            post(body, reason=condition["reason"], message=condition["message"])
    if all(previous.get(key) == value for key, value in status.items()):
        return None
    meta = body["metadata"]
    return await kube.merge_patch(body["kind"], meta.get("namespace"), meta["name"], {"status": status},
                                  sub="status")


def ready_condition(pool: dict[str, Any], ready: bool, reason: Reason, message: str) -> dict[str, Any]:
    return {"type": "Ready", "status": str(ConditionStatus.TRUE if ready else ConditionStatus.FALSE),
            "reason": str(reason), "message": message,
            "observedGeneration": pool["metadata"].get("generation"),
            "lastTransitionTime": format_time(datetime.now(UTC))}


def _newest(members: Members, pod: dict[str, Any]) -> bool:
    """Record `pod` as seen; False when a newer version of it was seen before."""
    name, version = pod["metadata"]["name"], resource_version(pod)
    if version < members.seen.get(name, 0):
        return False
    members.seen[name] = version
    return True


def _remember(pod: dict[str, Any]) -> None:
    """Index a pod of ours by the pool it belongs or belonged to; wake that pool's worker."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    namespace, name = meta["namespace"], meta["name"]
    if naming.POOL_LABEL in labels:
        key = (namespace, labels[naming.POOL_LABEL])
        if _newest(_members[key], pod):
            _members[key].unclaimed[name] = pod
    elif naming.CLAIMED_FROM_LABEL in labels:
        key = (namespace, labels[naming.CLAIMED_FROM_LABEL])
        if _newest(_members[key], pod):
            _members[key].unclaimed.pop(name, None)
            _members[key].claimed.add(name)
    else:
        return
    worker = _workers.get(key)
    if worker is not None:
        worker.wake()


def _forget(pod: dict[str, Any]) -> None:
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    for label in (naming.POOL_LABEL, naming.CLAIMED_FROM_LABEL):
        if label in labels:
            key = (meta["namespace"], labels[label])
            _newest(_members[key], pod)
            _members[key].unclaimed.pop(meta["name"], None)
            _members[key].claimed.discard(meta["name"])
            worker = _workers.get(key)
            if worker is not None:
                worker.wake()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def pool_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    pool = event["object"]
    key = _key(pool)
    if event["type"] == "DELETED":
        _pools.pop(key, None)
        worker = _workers.pop(key, None)
        if worker is not None:
            worker.task.cancel()
        with contextlib.suppress(KeyError):  # never set: the worker had not run yet
            metrics.POOL_READY.remove(key[0], pool["metadata"]["name"])
        return  # its members go with it: the pool owns them
    known = _pools.get(key)
    if known is not None and known["metadata"].get("uid") == pool["metadata"].get("uid") and \
            resource_version(known) > resource_version(pool):
        return
    _pools[key] = pool
    worker = _workers.get(key)
    if worker is None or worker.task.done():
        worker = _workers[key] = PoolWorker(memo.kube, memo.settings, memo.leadership, key)
    worker.wake()


@kopf.on.event("", "v1", "pods", labels={naming.MANAGED_BY: naming.MANAGER})
async def pool_pod_event(event: kopf.RawEvent, **_: Any) -> None:
    if event["type"] == "DELETED":
        _forget(event["object"])
    else:
        _remember(event["object"])


def pools_in(namespace: str) -> bool:
    return any(key[0] == namespace for key in _pools)


_last_claim = 0.0  # time.monotonic() of the latest claim that got a member


def _claiming_lately() -> bool:
    return time.monotonic() - _last_claim < CLAIMS_QUIET_SECONDS


# Members a claim of this process is taking over right now: no other claim here tries them meanwhile (the
# resourceVersion precondition settles a race with another process).
_claiming: set[tuple[str, str]] = set()


def _next_candidate(namespace: str, wanted: str, tried: set[str]) -> tuple[str, dict[str, Any]] | None:
    """The oldest ready unclaimed member of that template in the namespace, not being claimed and not
    `tried` already: (its pool's label value, its pod)."""
    found = [(key[1], pod) for key, members in _members.items() if key[0] == namespace and key in _pools
             for pod in members.unclaimed.values()
             if _of_template(pod, wanted) and _ready(pod) and pod["metadata"]["name"] not in tried
             and (namespace, pod["metadata"]["name"]) not in _claiming]
    return min(found, key=lambda item: item[1]["metadata"].get("creationTimestamp") or "", default=None)


# as_member(member, token): the session's children and pod under the member's name, with that runner
# token (base64; None: a new one).
AsMember = Callable[[str, str | None], tuple[dict[str, dict[str, Any]], dict[str, Any]]]


async def claim(kube: Kube, session: Session, wanted: str, note: Callable[[str], Awaitable[None]],
                as_member: AsMember) -> tuple[str, dict[str, dict[str, Any]]] | None:
    """Take over a ready member for `session`, whose sandbox hashes to `wanted` (template_hash) and whose
    workspace claim asks for what the member's does (member_hash: the handover could not resize it): (the
    member's name, every child as handed over). `note(member)` names the member on the session before the
    handover, so a restart finishes what a crash interrupted: a session that names one already
    (session.member) takes that one if it still can. None: start cold."""
    global _last_claim
    if session.member is not None:
        children = await take(kube, session, session.member, None, as_member)
        if children is not None:
            return session.member, children
    if not pools_in(session.namespace):
        return None
    started = time.perf_counter()
    wanted = member_hash(wanted, build_pvc(session))
    tried: set[str] = set()  # a member lost to another session, or gone, is not the next candidate too
    for _ in range(CLAIM_ATTEMPTS):
        candidate = _next_candidate(session.namespace, wanted, tried)
        if candidate is None:
            break
        pod = candidate[1]
        tried.add(pod["metadata"]["name"])
        reserved = (session.namespace, pod["metadata"]["name"])
        _claiming.add(reserved)
        try:
            await note(pod["metadata"]["name"])
            children = await take(kube, session, pod["metadata"]["name"], pod, as_member)
        finally:
            _claiming.discard(reserved)
        if children is not None:
            _last_claim = time.monotonic()
            metrics.POOL_CLAIMS.labels(outcome="hit").inc()
            metrics.POOL_CLAIM_SECONDS.observe(time.perf_counter() - started)
            return pod["metadata"]["name"], children
    metrics.POOL_CLAIMS.labels(outcome="miss").inc()
    return None


async def take(kube: Kube, session: Session, name: str, pod: dict[str, Any] | None,
               as_member: AsMember) -> dict[str, dict[str, Any]] | None:
    """Hand member `name` over to the session: its pod first, on the version seen (of two claimants one
    wins), then its other children as the session's. Idempotent: a pod the session holds already is
    handed over again, keeping the session's runner token if the Secret has it. None when the member is
    gone or another session has it."""
    namespace = session.namespace
    # The version seen may be older than the pod's (its kubelet wrote its status since): after a conflict
    # the pod is read once more, and taken on that version while it is still the pool's.
    for read in (pod is None, True):
        if read:
            pod = await kube.get("Pod", namespace, name)
            if pod is None:
                return None
            _remember(pod)
        assert pod is not None
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        owners = [ref.get("uid") for ref in meta.get("ownerReferences") or [] if ref.get("controller")]
        mine = owners == [session.uid]
        if not mine and (naming.POOL_LABEL not in labels or meta.get("deletionTimestamp")):
            return None
        token = None
        if mine:
            secret = await kube.get("Secret", namespace, name)
            kept = ((secret or {}).get("data") or {}).get(RUNNER_TOKEN_KEY)
            token = None if is_pool_token(kept) else kept
        children, desired_pod = as_member(name, token)
        pool_name = labels.get(naming.POOL_LABEL) or labels.get(naming.CLAIMED_FROM_LABEL) or ""
        try:
            taken = await kube.merge_patch("Pod", namespace, name, handover(
                session, pool_name, desired_pod, None if mine else meta["resourceVersion"]))
            break
        except ApiException as error:
            if error.status != 409:
                raise
    else:
        return None  # changed again since it was read: another session took it first
    if taken is None:
        return None
    _remember(taken)
    fresh = ("Service", "NetworkPolicy")
    applied = await asyncio.gather(*(kube.apply(children[kind]) for kind in MEMBER_KINDS[:-1]),
                                   *(_create_or_apply(kube, children[kind]) for kind in fresh))
    # A change to the pod makes its kubelet sync it, which rewrites its Secret and ConfigMap volumes at
    # once (else at its next periodic sync, up to a minute): the waiting runner sees its token sooner.
    touched = await kube.merge_patch("Pod", namespace, name, {"metadata": {"annotations": {
        naming.CLAIMED_AT_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}}})
    if touched is not None:
        _remember(touched)
    return {"Pod": touched or taken, **dict(zip([*MEMBER_KINDS[:-1], *fresh], applied, strict=True))}


async def _create_or_apply(kube: Kube, manifest: dict[str, Any]) -> dict[str, Any]:
    """A child the member never had: created outright (one call), applied when a pass before made it."""
    return await kube.create(manifest) or await kube.apply(manifest)
