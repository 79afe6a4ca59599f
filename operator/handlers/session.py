"""AgentSession: render every child from (spec, references), apply each with an ownership check, and
derive status from what is observed. Safe to kill at any line: every step is an idempotent apply."""

import asyncio
import contextlib
import dataclasses
import logging
from collections import defaultdict
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from agentbox.crds import agentsession
from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.crds.conditions import Reason, SessionPhase
from agentbox.operator import metrics, naming, workspace
from agentbox.operator.build.common import Session
from agentbox.operator.build.pod import template_hash
from agentbox.operator.build.pool import is_pool_token
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY, new_runner_token
from agentbox.operator.handlers import pool
from agentbox.operator.kube import (
    Conflict,
    Kube,
    Ownership,
    api_message,
    api_status,
    classify,
    resource_version,
)
from agentbox.operator.later import Later
from agentbox.operator.rendering import CHILD_KINDS, Rendering, render
from agentbox.operator.settings import FINALIZER, OperatorSettings
from agentbox.operator.status import (
    Observed,
    derive,
    expiry,
    invalid_spec,
    next_deadline,
    parse_time,
    suspension_patch,
    waiting_for_claim,
)

GROUP, VERSION, PLURAL = agentsession.GROUP, agentsession.VERSION, agentsession.PLURAL
log = logging.getLogger(__name__)

# One reconciliation per session at a time, whichever watch (session, pod, MCPServer) triggered it.
_locks: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
# The newest version of every session seen on the watch or in our own write responses: reconciles start
# from it instead of re-reading the session (one GET fewer per trigger).
_latest: dict[tuple[str, str], dict[str, Any]] = {}
# The session each known child name belongs to, for the log lines about a session's pod and claim.
_sessions_by_child: dict[tuple[str, str], tuple[str, str]] = {}
# A new session's first pass waits this long for its claim to bind before creating its pod (see
# workspace.py); after that the pod is held, and the claim's watch event creates it.
CLAIM_WAIT_SECONDS = 1.0
_claim_bound: dict[tuple[str, str], asyncio.Event] = {}
_held: dict[str, dict[str, Any]] = {}  # by the session's uid: a later session of the same name holds its own


def _annotation(body: Mapping[str, Any] | None, key: str) -> str | None:
    return (((body or {}).get("metadata") or {}).get("annotations") or {}).get(key)


def request_id(body: Mapping[str, Any] | None) -> str | None:
    """The id of the API request behind the session's current state (absent for kubectl's changes)."""
    return _annotation(body, naming.REQUEST_ID_ANNOTATION)


def _traced(body: Mapping[str, Any], message: str) -> str:
    """An Event's message naming that request (kopf posts Events with no annotations of their own)."""
    known = request_id(body)
    return f"{message} (request {known})" if known else message


def _about(key: tuple[str, str]) -> dict[str, Any]:
    """The fields of our own log lines about a session."""
    known = request_id(_latest.get(key))
    return {"session": f"{key[0]}/{key[1]}", **({"request_id": known} if known else {})}


class RequestIdFilter(logging.Filter):
    """kopf's log lines about a session, its pod or its claim (kopf puts the object's reference on each
    record as `k8s_ref`) carry the session's request id, a field of the JSON line."""

    def filter(self, record: logging.LogRecord) -> bool:
        ref = getattr(record, "k8s_ref", None) or {}
        where = (ref.get("namespace"), ref.get("name"))
        if ref.get("kind") == agentsession.KIND:
            body = _latest.get(where)
            known = request_id(body) if body and body["metadata"].get("uid") == ref.get("uid") else None
        elif ref.get("kind") in ("Pod", "PersistentVolumeClaim") and where in _sessions_by_child:
            known = request_id(_latest.get(_sessions_by_child[where]))
        else:
            known = None
        if known and not hasattr(record, "request_id"):
            record.request_id = known
        return True


logging.getLogger("kopf.objects").addFilter(RequestIdFilter())
# The next check of each session with a shutdownTime (expiry) or idleTimeout (suspension); no kopf timer:
# no finalizer.
_expiries = Later(about=_about)
# A full reconcile again after a held pod could not be created (its name taken, refused, an API error).
_retries = Later(about=_about)
# A pod's progress short of Running is written a moment late: a pod scheduled and started at once then
# costs one status write instead of two (each a tenth of the apiserver's work for a session, profiled).
_settling = Later(about=_about)
SETTLE_SECONDS = 0.15
# The newest resourceVersion of each session's pod seen (watch events, our own reads and creates). A status
# from an older pod is not written: a settled write would otherwise land after its pod's next event was
# written, and leave the session Starting beside a Ready pod for good.
_pod_versions: dict[tuple[str, str], int] = {}


def _newest_pod(key: tuple[str, str], pod: dict[str, Any] | None) -> bool:
    """Record `pod` as seen for the session; False when a newer version of it was seen before."""
    if pod is None:
        return True
    version = resource_version(pod)
    if version < _pod_versions.get(key, 0):
        return False
    _pod_versions[key] = version
    return True


def remember(body: dict[str, Any]) -> None:
    """Keep `body` unless a newer version of the same session is already known (managedFields dropped:
    the bulk of a body, never read)."""
    meta = body["metadata"]
    if "managedFields" in meta:
        meta = {key: value for key, value in meta.items() if key != "managedFields"}
        body = {**body, "metadata": meta}
    key = (meta["namespace"], meta["name"])
    known = _latest.get(key)
    _sessions_by_child[(key[0], naming.session_child_name(key[1], meta.get("annotations")))] = key
    if known is None or known["metadata"].get("uid") != meta.get("uid") or \
            resource_version(body) >= resource_version(known):
        _latest[key] = body


async def _current(kube: Kube, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
    """The session as last seen (read once when unknown); None when it is gone or was recreated."""
    body = _latest.get((namespace, name))
    if body is None:
        body = await kube.get(agentsession.KIND, namespace, name)
        if body is not None:
            remember(body)
    return body if body is not None and body["metadata"]["uid"] == uid else None


def provider_key_secrets() -> dict[tuple[str, str], list[str]]:
    """(namespace, Secret) -> the sessions whose spec.egress.providerKey it holds (of those seen)."""
    sessions_by_secret: dict[tuple[str, str], list[str]] = {}
    for (namespace, name), body in _latest.items():
        ref = (((body.get("spec") or {}).get("egress") or {}).get("providerKey") or {}).get("name")
        if ref:
            sessions_by_secret.setdefault((namespace, ref), []).append(name)
    return sessions_by_secret


class NameConflictError(kopf.TemporaryError):
    """A child's name is held by an object we do not own; retried slowly in case it goes away."""


class PodRejectedError(kopf.TemporaryError):
    """The apiserver refused the pod (quota, admission); retried slowly in case room appears."""


class ProviderKeyMissingError(kopf.TemporaryError):
    """spec.egress.providerKey names a Secret key that does not exist; retried slowly until it does."""


class ClaimUpdateRefusedError(kopf.TemporaryError):
    """The apiserver refused to grow the workspace claim (its StorageClass allows no expansion); the
    session runs on with the claim as it is, and the resize is tried again slowly."""


API_RETRY_SECONDS = 5.0
EXPIRY_SLACK_SECONDS = 0.5  # wake just after the deadline, not just before it
SUSPEND_RETRY_SECONDS = 0.5

def namespace_terminating(error: ApiException) -> bool:
    """Refused because the namespace is being deleted: its sessions go with it, nothing to report."""
    causes = (api_status(error).get("details") or {}).get("causes") or []
    return error.status == 403 and any(cause.get("reason") == "NamespaceTerminating" for cause in causes)


def _now() -> datetime:
    return datetime.now(UTC)


def _created(body: dict[str, Any]) -> datetime:
    return parse_time(body["metadata"].get("creationTimestamp")) or _now()


QUIET_REASONS = (Reason.SUSPENDED_BY_USER, Reason.IDLE_TIMEOUT_REACHED)  # Ready False, nothing wrong


def _announce(body: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
    """Kubernetes Events for the steps a user waits on: Ready turning True or failing, MCPReady failing or
    recovering. "Pod starting" is already said by PodCreated, and every Event is one more API write."""
    def reasons(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
        return {c["type"]: (c.get("status"), c.get("reason")) for c in status.get("conditions") or []}

    old, new = reasons(before), reasons(after)
    conditions = {c["type"]: c for c in after["conditions"]}
    for kind in ("Ready", "MCPReady"):
        if old.get(kind) == new.get(kind):
            continue
        condition = conditions[kind]
        healthy = condition["status"] == "True"
        if (kind == "Ready" and condition["reason"] == Reason.POD_STARTING) or (
                kind == "MCPReady" and healthy and old.get(kind, ("Unknown",))[0] != "False"):
            continue
        post = kopf.info if healthy or condition["reason"] in QUIET_REASONS else kopf.warn
        post(body, reason=condition["reason"],
             message=_traced(body, f"{after['phase']}: {condition['message']}"))


def _changed(previous: dict[str, Any], status: dict[str, Any]) -> bool:
    comparable = {key: value for key, value in status.items() if value is not None}
    return {key: value for key, value in previous.items() if key in comparable} != comparable or any(
        previous.get(key) is not None for key, value in status.items() if value is None)


async def _write_status(kube: Kube, body: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    """Returns the session as written (`body` when nothing changed)."""
    meta = body["metadata"]
    previous = body.get("status") or {}
    metrics.record_phase((meta["namespace"], meta["name"]), status["phase"])
    if not _changed(previous, status):
        return body
    written = await kube.merge_patch(agentsession.KIND, meta["namespace"], meta["name"],
                                     {"status": status}, sub="status")
    _announce(body, previous, status)
    if written is None:
        return body
    remember(written)
    return written


def _schedule_expiry(kube: Kube, settings: OperatorSettings, observed: Observed, status: dict[str, Any],
                     uid: str) -> None:
    """Wake up when the session would expire or idle (checked again then: activity may have moved it on)."""
    key = (observed.namespace, observed.name)
    deadline = next_deadline(dataclasses.replace(observed, previous=status), _now())
    if deadline is None or status["phase"] in (SessionPhase.EXPIRED, SessionPhase.TERMINATING):
        _expiries.cancel(key)
        return
    owner = {"metadata": {"namespace": observed.namespace, "name": observed.name, "uid": uid}}
    _reconcile_later(_expiries, kube, settings, owner,
                     (deadline - _now()).total_seconds() + EXPIRY_SLACK_SECONDS)


def _reconcile_later(later: Later, kube: Kube, settings: OperatorSettings, owner: dict[str, Any],
                     delay: float) -> None:
    """A full reconcile in `delay` seconds; one that fails goes again, after the delay it asks for."""
    meta = owner["metadata"]

    def again() -> Awaitable[None]:
        return _or_reconcile_later(later, kube, settings, owner, reconcile(kube, settings, owner))

    later.schedule((meta["namespace"], meta["name"]), delay, again)


async def _or_reconcile_later(later: Later, kube: Kube, settings: OperatorSettings, owner: dict[str, Any],
                              work: Awaitable[Any]) -> None:
    """`work` for a session, which a full reconcile takes over when it fails: kopf hands a watch event to
    its handler once, so what an apiserver error or a lost connection stopped would otherwise be lost
    until the session's next event (a status left Pending beside a running pod)."""
    try:
        await work
    except kopf.PermanentError:
        raise  # an invalid spec: nothing to try again until the spec changes
    except Exception as error:
        delay = (error.delay if isinstance(error, kopf.TemporaryError) else None) or API_RETRY_SECONDS
        key = (owner["metadata"]["namespace"], owner["metadata"]["name"])
        why = f"{error.status}: {api_message(error)}" if isinstance(error, ApiException) else (
            str(error) or repr(error))
        log.warning("session work failed (%s): a full reconcile follows in %.0f s", why, delay,
                    extra=_about(key))
        _reconcile_later(later, kube, settings, owner, delay)


def _observed(body: dict[str, Any], spec: AgentSessionSpec, **seen: Any) -> Observed:
    meta = body["metadata"]
    return Observed(generation=meta.get("generation", 0), spec=spec, name=meta["name"],
                    namespace=meta["namespace"], created=_created(body),
                    annotations=meta.get("annotations") or {}, previous=body.get("status") or {},
                    deleting=bool(meta.get("deletionTimestamp")), **seen)


async def _create_pod(kube: Kube, desired: dict[str, Any], body: dict[str, Any]) -> dict[str, Any] | None:
    """Create the pod; None when its name is taken. A refusal (quota, admission) is a PodRejectedError."""
    try:
        created = await kube.create(desired)
    except ApiException as error:
        if error.status in (403, 422) and not namespace_terminating(error):
            raise PodRejectedError(api_message(error)) from error
        raise
    if created is not None:
        kopf.event(body, type="Normal", reason="PodCreated",
                   message=_traced(body, f"created sandbox pod {desired['metadata']['name']}"))
    return created


async def _first_pod(kube: Kube, desired: dict[str, Any], body: dict[str, Any]) -> dict[str, Any] | None:
    """The pod in the same round as the other children: a refusal here is left to the pass's own pod step,
    which tries again and reports it on the session."""
    with contextlib.suppress(PodRejectedError):
        return await _create_pod(kube, desired, body)
    return None


async def _ensure_pod(kube: Kube, desired: dict[str, Any], existing: dict[str, Any] | None,
                      ownership: Ownership, body: dict[str, Any]) -> dict[str, Any] | None:
    """Pods are immutable: create when absent, replace when its rendered spec or config changed."""
    if existing is not None:
        wanted = desired["metadata"]["annotations"]
        current = existing["metadata"].get("annotations") or {}
        config_changed = current.get(naming.CONFIG_HASH_ANNOTATION) != wanted[naming.CONFIG_HASH_ANNOTATION]
        spec_changed = naming.SPEC_HASH_ANNOTATION in current and \
            current[naming.SPEC_HASH_ANNOTATION] != wanted[naming.SPEC_HASH_ANNOTATION]
        if ownership is Ownership.OURS and not (config_changed or spec_changed):
            return existing
        if existing["metadata"].get("deletionTimestamp") is None:
            await kube.delete("Pod", existing["metadata"]["namespace"], existing["metadata"]["name"],
                              uid=existing["metadata"]["uid"])
            what = "pod spec" if spec_changed else "configuration"
            kopf.event(body, type="Normal", reason="PodReplaced",
                       message=_traced(body, f"{what} changed: replacing the sandbox pod"))
        return None  # its DELETED event brings us back to create the new one
    return await _create_pod(kube, desired, body)


async def _annotate_member(kube: Kube, body: dict[str, Any], member: str | None) -> dict[str, Any]:
    meta = body["metadata"]
    patched = await kube.merge_patch(agentsession.KIND, meta["namespace"], meta["name"], {
        "metadata": {"annotations": {naming.POOL_MEMBER_ANNOTATION: member}}})
    if patched is None:
        return body
    remember(patched)
    return patched


async def _claim_member(kube: Kube, body: dict[str, Any], session: Session, rendering: Rendering,
                        desired: dict[str, dict[str, Any]]
                        ) -> tuple[dict[str, Any], Session, dict[str, dict[str, Any]]]:
    """A new session takes over a ready pool member of its template, if one is there: (the session as
    patched, the session with its member, every child as the handover left it, in the session's desired
    state). `desired`: the session's children but the pod, with its new runner token. The member is named
    on the session before the handover, so that a pass killed in between finishes it, or starts cold when
    another session got the member; a member already the session's is left to the full pass."""
    pod = rendering.pod(session, desired)
    wanted = template_hash(pod, desired["ConfigMap"], desired["Secret"])
    noted = session.member

    async def note(member: str) -> None:
        nonlocal body, noted
        if noted != member:
            body, noted = await _annotate_member(kube, body, member), member

    def as_member(member: str, token: str | None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
        claimant = dataclasses.replace(session, member=member)
        children = rendering.children(claimant, token or desired["Secret"]["data"][RUNNER_TOKEN_KEY])
        return children, rendering.pod(claimant, children)

    claimed = await pool.claim(kube, session, wanted, note, as_member)
    if claimed is None:
        if noted is not None:
            body = await _annotate_member(kube, body, None)
        return body, dataclasses.replace(session, member=None), {}
    member, children = claimed
    if member != session.member:
        kopf.info(body, reason=Reason.POOL_MEMBER_CLAIMED,
                  message=_traced(body, f"claimed pre-started sandbox {member}"))
    return body, dataclasses.replace(session, member=member), children


async def _undo(kube: Kube, body: dict[str, Any], kind: str, created: dict[str, Any]) -> None:
    meta = created["metadata"]
    try:
        await kube.delete(kind, meta["namespace"], meta["name"], uid=meta["uid"])
    except ApiException as error:
        if error.status != 403:
            raise
        # Owned by the session, so garbage collection still removes it with the session.
        kopf.warn(body, reason="CleanupForbidden", message=_traced(
            body, f"may not delete {kind} {meta['name']}: {api_message(error)}"))


async def reconcile(kube: Kube, settings: OperatorSettings, body: dict[str, Any]) -> dict[str, Any]:
    """Bring one session's children to the desired state and write its status. Returns the status."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    async with _locks[(namespace, name)], metrics.reconciling("agentsession"):
        # The newest version under the lock: the triggering event may predate another trigger's write.
        fresh = await _current(kube, namespace, name, body["metadata"]["uid"])
        if fresh is None:
            return body.get("status") or {}
        try:
            return await _reconcile(kube, settings, fresh)
        except ApiException as error:
            if namespace_terminating(error):
                return fresh.get("status") or {}
            # Never a silent retry loop: the failure is on the session for `kubectl get` to show.
            message = f"{error.status}: {api_message(error)}"
            spec = AgentSessionSpec.model_validate(fresh.get("spec") or {})
            status = derive(_observed(fresh, spec, blocked=(Reason.RECONCILE_ERROR, message)), _now())
            with contextlib.suppress(ApiException):
                await _write_status(kube, fresh, status)
            raise kopf.TemporaryError(message, delay=API_RETRY_SECONDS) from error


async def _patch_suspension(kube: Kube, body: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Idleness goes on the spec (status.suspension_patch), on the version read: an activity stamp written
    meanwhile wins, and the pass runs again on the newer version."""
    meta = body["metadata"]
    patch = {**patch, "metadata": {**patch["metadata"], "resourceVersion": meta["resourceVersion"]}}
    try:
        patched = await kube.merge_patch(agentsession.KIND, meta["namespace"], meta["name"], patch)
    except ApiException as error:
        if error.status == 409:
            raise kopf.TemporaryError("the session changed meanwhile", delay=SUSPEND_RETRY_SECONDS) from None
        raise
    if patched is None:
        return body
    remember(patched)
    return patched


async def _reconcile(kube: Kube, settings: OperatorSettings, body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    try:
        spec = AgentSessionSpec.model_validate(body.get("spec") or {})
    except ValidationError as error:
        # Admission rejects this normally; an older CRD version might not have.
        message = str(error)[:4000]
        await _write_status(kube, body, invalid_spec(body.get("status") or {}, meta.get("generation", 0),
                                                      message, _now()))
        raise kopf.PermanentError(f"invalid spec: {message}") from error
    patch = suspension_patch(_observed(body, spec), _now())
    if patch is not None:
        body = await _patch_suspension(kube, body, patch)
        meta, spec = body["metadata"], AgentSessionSpec.model_validate(body.get("spec") or {})
    session = Session(name, namespace, meta["uid"], spec,
                      member=(meta.get("annotations") or {}).get(naming.POOL_MEMBER_ANNOTATION))
    rendering = await render(kube, settings, namespace, spec)
    key_missing = rendering.key_missing

    def manifests(token: str) -> dict[str, dict[str, Any]]:
        return rendering.children(session, token)

    def pod_for(children: dict[str, dict[str, Any]]) -> dict[str, Any]:
        return rendering.pod(session, children)

    stopped = bool(spec.lifecycle.suspend or expiry(_observed(body, spec), _now())
                   or meta.get("deletionTimestamp"))
    wants_pod = not (stopped or key_missing)
    # A session never reconciled before: create each child outright, the pod in the same round as soon as
    # its claim exists (one call each instead of a read plus an apply; the scheduler can do nothing with a
    # pod whose claim does not exist yet, and a failed attempt costs a backoff); only names already taken
    # are read and classified below.
    new_token = new_runner_token()
    first_pass = not (body.get("status") or {}).get("observedGeneration")
    # A claimed pool member's children, as the handover left them: as this pass would have created them.
    created: dict[str, dict[str, Any]] = {}
    if first_pass and wants_pod:
        body, session, created = await _claim_member(kube, body, session, rendering, manifests(new_token))
        meta = body["metadata"]
    # The first pass made the claim just now, so no pod of ours can exist yet: one held back is not read.
    held_from_first_pass = False
    if first_pass and session.member is None:
        # Written before any child exists: a pass cut short below (a crash, a lost connection) is no first
        # pass when it runs again, so it finishes these children rather than claim a pool member beside them.
        body = await _write_status(kube, body, derive(
            _observed(body, spec, mcp_problems=tuple(rendering.mcp.problems)), _now()))
        meta = body["metadata"]
        bound = _claim_bound[(namespace, name)] = asyncio.Event()  # before the claim can exist
        first = manifests(new_token)
        creates = {kind: asyncio.ensure_future(kube.create(manifest)) for kind, manifest in first.items()}
        if wants_pod:
            first["Pod"] = pod_for(first)

            async def pod_after_claim() -> dict[str, Any] | None:
                nonlocal held_from_first_pass
                claim = await creates["PersistentVolumeClaim"]
                if await creates["Secret"] is None:
                    # A Secret left by an earlier pass holds another runner token: the pod waits for the
                    # pass below, which reads it, rather than going out now only to be replaced.
                    return None
                if claim is not None and await workspace.pod_waits_for(kube, claim):
                    try:
                        await asyncio.wait_for(bound.wait(), CLAIM_WAIT_SECONDS)
                    except TimeoutError:
                        held_from_first_pass = True
                        return None
                return await _first_pod(kube, first["Pod"], body)

            creates["Pod"] = asyncio.ensure_future(pod_after_claim())
        try:
            results = await asyncio.gather(*creates.values())
        finally:
            del _claim_bound[(namespace, name)]
        created = {kind: result for kind, result in zip(first, results, strict=True) if result is not None}
    child = session.child_name
    to_read = [kind for kind in CHILD_KINDS
               if kind not in created and not (kind == "Pod" and held_from_first_pass)]
    found = dict(zip(to_read, await asyncio.gather(*(kube.get(kind, namespace, child) for kind in to_read)),
                     strict=True))
    ownership = {kind: classify(found[kind], session.uid, session.labels) for kind in to_read}
    conflicts = [Conflict(kind, child, "held by another owner") for kind in to_read
                 if ownership[kind] is Ownership.FOREIGN]
    if conflicts:
        # Nothing half-built stays behind: what this pass created goes again.
        await asyncio.gather(*(_undo(kube, body, kind, obj) for kind, obj in created.items()))
        message = "; ".join(conflict.message for conflict in conflicts)
        status = derive(_observed(body, spec, mcp_problems=tuple(rendering.mcp.problems), conflict=message),
                        _now())
        await _write_status(kube, body, status)
        raise NameConflictError(message, delay=settings.conflict_retry_seconds)

    old_secret = created.get("Secret") or (
        found.get("Secret") if ownership.get("Secret") not in (None, Ownership.ABSENT) else None)
    token = ((old_secret or {}).get("data") or {}).get(RUNNER_TOKEN_KEY)
    if not token or is_pool_token(token):  # a pool member's token is never a session's
        token = new_token
    desired = manifests(token)
    to_apply = [kind for kind in desired if kind not in created]
    claim_refused: str | None = None

    async def apply(kind: str) -> dict[str, Any]:
        nonlocal claim_refused
        try:
            return await kube.apply(desired[kind])
        except ApiException as error:
            existing = found.get(kind)
            if kind != "PersistentVolumeClaim" or existing is None or error.status not in (403, 422) or \
                    namespace_terminating(error):
                raise
            claim_refused = api_message(error)
            return existing

    applied = await asyncio.gather(*(apply(kind) for kind in to_apply))
    pvc = {**created, **dict(zip(to_apply, applied, strict=True))}["PersistentVolumeClaim"]

    pod = created.get("Pod") or found.get("Pod")
    _newest_pod((namespace, name), pod)
    _held.pop(session.uid, None)
    if wants_pod and pod is None and await workspace.pod_waits_for(kube, pvc):
        _held[session.uid] = pod_for(desired)
    elif wants_pod:
        try:
            pod = await _ensure_pod(kube, pod_for(desired), pod, ownership.get("Pod", Ownership.OURS), body)
            _newest_pod((namespace, name), pod)
        except PodRejectedError as rejection:
            observed = _observed(body, spec, mcp_problems=tuple(rendering.mcp.problems), pvc=pvc,
                                 blocked=(Reason.POD_REJECTED, str(rejection)))
            await _write_status(kube, body, derive(observed, _now()))
            raise PodRejectedError(str(rejection), delay=settings.conflict_retry_seconds) from None
    elif pod is not None:
        await kube.delete("Pod", namespace, child, uid=pod["metadata"]["uid"])
        pod = None
    blocked = (Reason.PROVIDER_KEY_NOT_FOUND, key_missing) if key_missing else None
    observed = _observed(body, spec, mcp_problems=tuple(rendering.mcp.problems), pvc=pvc, pod=pod,
                         blocked=blocked, claim_refused=claim_refused)
    status = derive(observed, _now())
    await _write_status(kube, body, status)
    _schedule_expiry(kube, settings, observed, status, meta["uid"])
    if key_missing and not stopped:
        raise ProviderKeyMissingError(key_missing, delay=settings.conflict_retry_seconds)
    if claim_refused:
        raise ClaimUpdateRefusedError(claim_refused, delay=settings.conflict_retry_seconds)
    return status


async def refresh(kube: Kube, settings: OperatorSettings, body: dict[str, Any], pod: dict[str, Any] | None,
                  *, settle: bool = True, pvc: dict[str, Any] | None = None) -> None:
    """Status only, from a pod event: cheaper than a reconcile, keeps the last MCPReady verdict.

    `body` needs only the session's namespace, name and uid: the newest version is taken under the lock.
    With `settle`, a change short of Running waits SETTLE_SECONDS for the pod's next event to replace it.
    `pvc`: the claim as just seen, when the caller has it."""
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    async with _locks[key], metrics.reconciling("agentsession-status"):
        fresh = await _current(kube, meta["namespace"], meta["name"], meta["uid"])
        if fresh is None or not _newest_pod(key, pod):
            return
        body, meta = fresh, fresh["metadata"]
        spec = AgentSessionSpec.model_validate(body.get("spec") or {})
        scheduled = next((c for c in ((pod or {}).get("status") or {}).get("conditions") or []
                          if c.get("type") == "PodScheduled"), {})
        # A scheduled pod's claim is bound (the scheduler waits for it), and one the scheduler holds back
        # for its claim is not: no need to read the claim in either case.
        if scheduled.get("status") == "True":
            pvc = {"status": {"phase": "Bound"}}
        elif waiting_for_claim(scheduled):
            pvc = {"status": {"phase": "Pending"}}
        elif pvc is None:
            pvc = await kube.get("PersistentVolumeClaim", meta["namespace"],
                                 naming.session_child_name(meta["name"], meta.get("annotations")))
        observed = _observed(body, spec, pvc=pvc, pod=pod)
        status = derive(observed, _now())
        if settle and status["phase"] in (SessionPhase.PENDING, SessionPhase.STARTING) and _changed(
                body.get("status") or {}, status):
            owner = {"metadata": {"namespace": key[0], "name": key[1], "uid": meta["uid"]}}
            _settling.schedule(key, SETTLE_SECONDS, lambda: _or_reconcile_later(
                _retries, kube, settings, owner, refresh(kube, settings, owner, pod, settle=False, pvc=pvc)))
            return
        _settling.cancel(key)
        await _write_status(kube, body, status)
        _schedule_expiry(kube, settings, observed, status, meta["uid"])


def _memo(memo: Any) -> tuple[Kube, OperatorSettings]:
    return memo.kube, memo.settings


# Annotations that need no reconcile of their own: the API's activity stamp, and the pool member the
# operator names within the reconcile that claims it.
OPERATOR_ANNOTATIONS = (naming.LAST_ACTIVITY_ANNOTATION, naming.POOL_MEMBER_ANNOTATION)


def _without_activity(essence: Mapping[str, Any] | None) -> dict[str, Any]:
    """A handled state (spec, labels, annotations) without the activity stamp; empty stanzas dropped as
    kopf drops them, so a first stamp compares equal to none."""
    meta = dict((essence or {}).get("metadata") or {})
    meta["annotations"] = {key: value for key, value in (meta.get("annotations") or {}).items()
                           if key not in OPERATOR_ANNOTATIONS}
    meta = {key: value for key, value in meta.items() if value}
    rest = {key: value for key, value in (essence or {}).items() if key != "metadata"}
    return {**rest, "metadata": meta} if meta else rest


def beyond_activity(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None, **_: Any) -> bool:
    """Whether an update is more than the API's activity stamp. A stamp only moves the idle deadline,
    which session_event moves in memory: a full reconcile for it would cost a dozen API calls a message."""
    return _without_activity(old) != _without_activity(new)


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, when=beyond_activity)
async def session_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    kube, settings = _memo(memo)
    await reconcile(kube, settings, dict(body))


@kopf.on.delete(GROUP, VERSION, PLURAL,
                when=lambda spec, **_: bool((spec.get("workspace") or {}).get("retainOnDelete")))
async def release_workspace(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """retainOnDelete: cut the claim loose from garbage collection before the session goes."""
    kube, _settings = _memo(memo)
    meta = body["metadata"]
    name = naming.session_child_name(meta["name"], meta.get("annotations"))
    claim = await kube.get("PersistentVolumeClaim", meta["namespace"], name)
    if classify(claim, meta["uid"], {}) is not Ownership.OURS:
        return  # released already, or never this session's: another owner's references are not ours to cut
    # On the version read: a conflict (changed meanwhile) is retried by kopf on a fresh read.
    release = {"metadata": {"ownerReferences": None, "resourceVersion": claim["metadata"]["resourceVersion"]}}
    released = await kube.merge_patch("PersistentVolumeClaim", meta["namespace"], name, release)
    if released is not None:
        kopf.info(body, reason="WorkspaceRetained",
                  message=_traced(body, "workspace claim kept after deletion"))


async def let_go_in(kube: Kube, namespace: str) -> None:
    """The namespace is being deleted, and its claims with it: a retained workspace cannot outlive it, so
    our finalizer goes without the claim being cut loose. Done here, from the namespace's events, because
    kopf stops watching a namespace it serves by pattern as soon as the namespace starts terminating: the
    sessions' own deletion is never seen there, and the namespace would hang in Terminating."""
    for body in await kube.list(agentsession.KIND, namespace):
        meta = body["metadata"]
        finalizers = meta.get("finalizers") or []
        if FINALIZER not in finalizers:
            continue
        kept = [finalizer for finalizer in finalizers if finalizer != FINALIZER]
        with contextlib.suppress(ApiException):  # changed meanwhile: the namespace's next event retries
            await kube.merge_patch(agentsession.KIND, namespace, meta["name"], {"metadata": {
                "finalizers": kept or None, "resourceVersion": meta["resourceVersion"]}})


@kopf.on.event(GROUP, VERSION, PLURAL)
async def session_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Runs before the change handlers of the same event, so they find this version remembered."""
    body = event["object"]
    meta = body["metadata"]
    key = (meta["namespace"], meta["name"])
    if event["type"] == "DELETED":
        memo.handled.forget(meta["uid"])
        metrics.record_phase(key, None)
        _locks.pop(key, None)
        _latest.pop(key, None)
        _sessions_by_child.pop((key[0], naming.session_child_name(key[1], meta.get("annotations"))), None)
        _held.pop(meta["uid"], None)
        _pod_versions.pop(key, None)
        _expiries.cancel(key)
        _retries.cancel(key)
        _settling.cancel(key)
    else:
        seen = _annotation(_latest.get(key), naming.LAST_ACTIVITY_ANNOTATION)
        remember(body)
        latest = _latest[key]
        if _annotation(latest, naming.LAST_ACTIVITY_ANNOTATION) != seen and _expiries.pending(key):
            _move_expiry(memo, latest)


def _move_expiry(memo: kopf.Memo, body: dict[str, Any]) -> None:
    """New activity moves the idle deadline on: the pending expiry check is rescheduled, from what is
    known (status as last written), with no API call."""
    kube, settings = _memo(memo)
    status = body.get("status") or {}
    if status.get("phase"):
        spec = AgentSessionSpec.model_validate(body.get("spec") or {})
        _schedule_expiry(kube, settings, _observed(body, spec), status, body["metadata"]["uid"])


def _owner_session(child: dict[str, Any]) -> dict[str, Any] | None:
    """Enough of the owning session for reconcile/refresh, which take its newest version anyway."""
    for ref in child["metadata"].get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == agentsession.KIND:
            return {"metadata": {"namespace": child["metadata"]["namespace"], "name": ref["name"],
                                 "uid": ref["uid"]}}
    return None


SESSION_CHILD = {naming.MANAGED_BY: naming.MANAGER, naming.SESSION_LABEL: kopf.PRESENT}


async def release_pod(kube: Kube, settings: OperatorSettings, owner: dict[str, Any],
                      claim: dict[str, Any]) -> None:
    """Create the pod held back for this claim, now bound. When that fails (its name taken, refused, an
    API error), a full reconcile sorts it out and reports it on the session."""
    meta = owner["metadata"]
    key = (meta["namespace"], meta["name"])
    async with _locks[key], metrics.reconciling("agentsession-pod"):
        pod = _held.pop(meta["uid"], None)
        if pod is None:
            return  # created meanwhile
        body = await _current(kube, meta["namespace"], meta["name"], meta["uid"])
        if body is None:
            return
        try:
            created = await _create_pod(kube, pod, body)
            _newest_pod(key, created)
        except (ApiException, PodRejectedError):
            created = None
    if created is None:
        _reconcile_later(_retries, kube, settings, owner, 0)
    else:
        await refresh(kube, settings, owner, created, pvc=claim)


@kopf.on.event("", "v1", "persistentvolumeclaims", labels=SESSION_CHILD)
async def session_claim_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """A pod held back for its workspace claim goes out as soon as the claim is bound."""
    claim = event["object"]
    owner = _owner_session(claim)
    if event["type"] == "DELETED" or owner is None or not workspace.claim_bound(claim):
        return
    key = (owner["metadata"]["namespace"], owner["metadata"]["name"])
    waiting = _claim_bound.get(key)
    if waiting is not None:
        waiting.set()
    # Not only when a pod is held already: a reconcile may be about to hold one (it holds the lock).
    if key in _latest:
        kube, settings = _memo(memo)
        await _or_reconcile_later(_retries, kube, settings, owner, release_pod(kube, settings, owner, claim))


@kopf.on.event("", "v1", "pods", labels=SESSION_CHILD)
async def session_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    """Pod changes are watched, not polled: status follows them, a lost pod is recreated."""
    kube, settings = _memo(memo)
    pod = event["object"]
    body = _owner_session(pod)
    if body is None:
        return
    if event["type"] == "DELETED":
        await _or_reconcile_later(_retries, kube, settings, body, reconcile(kube, settings, body))
    elif event["type"] == "ADDED" and not (pod.get("spec") or {}).get("nodeName"):
        return  # a pod we just created: the reconcile that created it wrote the status it implies
    else:
        await _or_reconcile_later(_retries, kube, settings, body, refresh(kube, settings, body, pod))
