"""Sessions: AgentSession resources in the caller's tenant namespace, and a proxy to each one's runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field, ValidationError, model_validator

from agentbox.api import provider_keys
from agentbox.api.app import Services, services
from agentbox.api.auth import Principal, tenant_member
from agentbox.api.kube import MANAGED_BY, Kube, KubeError, tenant_namespace, user_label
from agentbox.api.observability import current_request_id
from agentbox.api.problems import ProblemError, field_errors, not_found, problem_responses
from agentbox.api.routers.common import (
    KUBE_PROBLEMS,
    AuditedRoute,
    audit_details,
    audit_success,
    audit_target,
    audited_transaction,
    background_task,
    kube,
    kube_problem,
    tenant_kube_problem,
)
from agentbox.api.routers.models import ApiModel, invalid_field
from agentbox.api.routers.prompts import compose_for, session_variables
from agentbox.api.runner_client import RunnerClient, RunnerUnavailable
from agentbox.api.watch_cache import WatchCache
from agentbox.crds.agentsession import (
    AgentSession,
    AgentSessionSpec,
    AgentSpec,
    Egress,
    HostPattern,
    Lifecycle,
    MCPServerRef,
    ObjectMeta,
    Tenant,
    Workspace,
)
from agentbox.crds.conditions import Reason, SessionPhase
from agentbox.crds.fields import DNS_LABEL_PATTERN, Condition, DnsLabel, parse_duration
from agentbox.crds.mcpserver import SecretKeySelector
from agentbox.crds.naming import (
    LAST_ACTIVITY_ANNOTATION,
    ORG_LABEL,
    REQUEST_ID_ANNOTATION,
    SUSPEND_REASON_ANNOTATION,
    USER_LABEL,
)
from agentbox.crds.providers import RUNTIME_PROVIDERS, Provider

router = APIRouter(prefix="/api/v1/sessions", tags=["sessions"], route_class=AuditedRoute)
log = logging.getLogger("agentbox.api.sessions")
SessionName = Annotated[str, Path(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
# The last-activity annotation is written at most this often per session (each write is an etcd write),
# and a quarter of a shorter idleTimeout.
ACTIVITY_PATCH_INTERVAL = 30.0
# A session resumed by a message is looked at this often until it is Ready (from the watch cache when
# there is one: no API call).
RESUME_POLL_SECONDS = 0.25
# A turn's work is followed at most this long (the runner's own turn timeout defaults to an hour).
TURN_FOLLOW_MAX_SECONDS = 6 * 3600.0
# Phases a resumed session does not leave on its own: the message is refused rather than waited for.
STUCK_PHASES = (SessionPhase.FAILED, SessionPhase.NEEDS_AUTH, SessionPhase.EXPIRED, SessionPhase.TERMINATING)


class EgressRequest(ApiModel):
    """Where the session's agent may connect through its egress proxy. The provider key is not given here:
    the session uses the caller's own stored key for its provider, else the org's (/api/v1/provider-keys)."""

    allow: list[HostPattern] = Field(default_factory=list, max_length=64, description=(
        "Hosts the agent may reach over HTTPS, beside the platform's default list: api.github.com, or "
        "*.example.com for every name under example.com. The provider's API needs no entry."))
    provider: Provider | None = Field(None, description="The model provider; defaults to the runtime's "
                                                        "(claude-code: anthropic, gemini: gemini, codex: "
                                                        "openai). Scripted and custom sessions may name one.")


class SessionCreate(ApiModel):
    name: DnsLabel | None = Field(None, description="Leave out to have one generated.")
    agent: AgentSpec = Field(default_factory=AgentSpec, description=(
        "The agent. Provider credentials, base URLs and proxy variables are refused in agent.env: store "
        "the key under /api/v1/provider-keys and the session's egress proxy adds it."))
    workspace: Workspace = Field(default_factory=Workspace)
    mcp_servers: list[MCPServerRef] = Field(default_factory=list, max_length=32)
    lifecycle: Lifecycle = Field(default_factory=Lifecycle)
    egress: EgressRequest = Field(default_factory=EgressRequest)

    @model_validator(mode="after")
    def _tenant_safe(self) -> SessionCreate:
        if self.agent.image is not None:
            raise invalid_field("agent.image", "is chosen by the platform, not per session", self.agent.image)
        for index, variable in enumerate(self.agent.env):
            if variable.value_from is not None:
                # valueFrom could read any Secret in the tenant namespace, other users' credentials included.
                raise invalid_field(f"agent.env.{index}.valueFrom",
                                    "is not allowed through the API; give a value", None)
        return self


class SessionView(ApiModel):
    name: str
    user: str
    runtime: str
    model: str | None = None
    phase: str | None = None
    ready: bool
    suspended: bool
    mcp_servers: list[str]
    conditions: list[Condition]
    created_at: datetime | None = None
    last_activity_time: datetime | None = None
    warm_start: bool = Field(description="The session took over a sandbox an AgentSessionPool had started "
                                         "ahead of it, rather than starting one.")


class MessageBody(ApiModel):
    content: Annotated[str, Field(min_length=1, max_length=100_000)]
    type: Literal["user", "raw"] = "user"


class RunnerStatus(ApiModel):
    model_config = ApiModel.model_config | {"extra": "allow", "alias_generator": None}

    status: str
    agent_type: str | None = None
    last_activity: datetime | None = None


def _ready(session: dict[str, Any]) -> bool:
    conditions = (session.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _last_activity(session: dict[str, Any]) -> datetime | None:
    """The later of the operator's status and the API's own stamp: an activity stamp alone is no change
    for the operator to act on, so the status catches up only at its next write."""
    stamps = [(session.get("status") or {}).get("lastActivityTime"),
              (session["metadata"].get("annotations") or {}).get(LAST_ACTIVITY_ANNOTATION)]
    moments = []
    for stamp in stamps:
        with contextlib.suppress(TypeError, ValueError):  # absent, or not a time (written by hand)
            moment = datetime.fromisoformat(stamp)
            moments.append(moment if moment.tzinfo else moment.replace(tzinfo=UTC))
    return max(moments, default=None)


def _traced() -> dict[str, dict[str, str]]:
    """Metadata naming the request that makes a change, so the operator's Events and logs can name it."""
    request_id = current_request_id()
    return {"annotations": {REQUEST_ID_ANNOTATION: request_id}} if request_id else {}


def _view(session: dict[str, Any]) -> SessionView:
    spec, status = session.get("spec", {}), session.get("status") or {}
    return SessionView(
        name=session["metadata"]["name"], user=spec.get("tenant", {}).get("user", ""),
        runtime=spec.get("agent", {}).get("runtime", "claude-code"), model=spec.get("agent", {}).get("model"),
        phase=status.get("phase"), ready=_ready(session),
        suspended=bool(spec.get("lifecycle", {}).get("suspend", False)),
        mcp_servers=[ref["name"] for ref in spec.get("mcpServers", [])],
        conditions=[Condition.model_validate(c) for c in status.get("conditions", [])],
        created_at=session["metadata"].get("creationTimestamp"),
        last_activity_time=_last_activity(session), warm_start=bool(status.get("poolMember")))


def _namespace(shared: Services, principal: Principal) -> str:
    return tenant_namespace(principal.org or "", shared.settings.tenant_namespace_prefix)


def _visible(principal: Principal, session: dict[str, Any]) -> bool:
    tenant = session.get("spec", {}).get("tenant", {})
    return tenant.get("org") == principal.org and (principal.is_admin or tenant.get("user") == principal.sub)


def _listed(principal: Principal, session: dict[str, Any]) -> bool:
    """What GET /sessions shows: the label selector of a live list, then `_visible` (same from the cache)."""
    labels = session["metadata"].get("labels") or {}
    return (labels.get(ORG_LABEL) == principal.org and
            (principal.is_admin or labels.get(USER_LABEL) == user_label(principal.sub)) and
            _visible(principal, session))


def _cache(shared: Services) -> WatchCache | None:
    """The session cache when it holds a complete picture; None sends reads to the API server."""
    cache = shared.sessions_cache
    return cache if cache is not None and cache.synced else None


async def _owned(client: Kube, shared: Services, principal: Principal, name: str) -> dict[str, Any]:
    """The session if the caller may see it; 404 alike for missing, another user's or another org's."""
    namespace = _namespace(shared, principal)
    cache = _cache(shared)
    try:
        session = cache.get(namespace, name) if cache else await client.get_session(namespace, name)
    except KubeError as exc:
        raise kube_problem(exc) from exc
    if session is None or not _visible(principal, session):
        raise not_found("session", name)
    return session


def _written(shared: Services, session: dict[str, Any]) -> dict[str, Any]:
    """The API's own write, shown by the cache at once."""
    if shared.sessions_cache is not None:
        shared.sessions_cache.observe(session)
    return session


@router.post("", status_code=201, response_model=SessionView, name="session.create",
             responses=problem_responses(400, 401, 403, 413, 422, 500, *KUBE_PROBLEMS))
async def create_session(body: SessionCreate, request: Request, principal: Principal = Depends(tenant_member),
                         shared: Services = Depends(services), client: Kube = Depends(kube)) -> SessionView:
    name = body.name or f"{body.agent.runtime}-{secrets.token_hex(4)}"
    namespace = _namespace(shared, principal)
    audit_target(request, f"session/{name}", runtime=body.agent.runtime)
    created: dict[str, Any] | None = None
    try:
        async with audited_transaction(request, principal) as conn:
            composed = await compose_for(conn, shared, principal,
                                         session_variables(name, body.agent.runtime, body.agent.model))
            provider = body.egress.provider or RUNTIME_PROVIDERS.get(body.agent.runtime)
            key = await provider_keys.resolve(conn, principal.sub, provider) if provider else None
            audit_details(request, prompt_version=composed.version, provider=provider,
                          provider_key=key["name"] if key else None)
            egress = Egress(allow=body.egress.allow, provider=body.egress.provider,
                            provider_key=SecretKeySelector(**key) if key else None)
            try:
                resource = AgentSession(
                    metadata=ObjectMeta(name=name, namespace=namespace, labels={
                        **MANAGED_BY, ORG_LABEL: principal.org, USER_LABEL: user_label(principal.sub)},
                        **_traced()),
                    spec=AgentSessionSpec(tenant=Tenant(org=principal.org, user=principal.sub),
                                          agent=body.agent, workspace=body.workspace,
                                          mcp_servers=body.mcp_servers, system_prompt=composed.text,
                                          lifecycle=body.lifecycle, egress=egress))
            except ValidationError as exc:
                raise ProblemError(422, "Unprocessable Content", "the session is not valid",
                                   errors=field_errors(exc.errors())) from exc
            try:
                created = _written(shared, await client.create_session(
                    namespace, resource.model_dump(by_alias=True, exclude_none=True, mode="json")))
            except KubeError as exc:
                raise tenant_kube_problem(exc, namespace) from exc
    except Exception:
        if created is not None:  # the audit row did not commit: take the resource back
            with contextlib.suppress(KubeError):
                await client.delete_session(namespace, name)
            if shared.sessions_cache is not None:
                shared.sessions_cache.forget(namespace, name)
        raise
    return _view(created)


@router.get("", response_model=list[SessionView], responses=problem_responses(401, 403, *KUBE_PROBLEMS))
async def list_sessions(principal: Principal = Depends(tenant_member), shared: Services = Depends(services),
                        client: Kube = Depends(kube)) -> list[SessionView]:
    namespace = _namespace(shared, principal)
    cache = _cache(shared)
    if cache is not None:
        items = sorted(cache.items(namespace), key=lambda item: item["metadata"]["name"])
    else:
        selector = f"{ORG_LABEL}={principal.org}"
        if not principal.is_admin:
            selector += f",{USER_LABEL}={user_label(principal.sub)}"
        try:
            items = await client.list_sessions(namespace, selector)
        except KubeError as exc:
            raise kube_problem(exc) from exc
    return [_view(item) for item in items if _listed(principal, item)]


@router.get("/{name}", response_model=SessionView,
            responses=problem_responses(401, 403, 404, 422, *KUBE_PROBLEMS))
async def get_session(name: SessionName, principal: Principal = Depends(tenant_member),
                      shared: Services = Depends(services), client: Kube = Depends(kube)) -> SessionView:
    return _view(await _owned(client, shared, principal, name))


@router.delete("/{name}", status_code=204, response_class=Response, name="session.delete",
               responses=problem_responses(401, 403, 404, 422, *KUBE_PROBLEMS))
async def delete_session(name: SessionName, request: Request, principal: Principal = Depends(tenant_member),
                         shared: Services = Depends(services), client: Kube = Depends(kube)) -> Response:
    audit_target(request, f"session/{name}")
    await _owned(client, shared, principal, name)
    async with audited_transaction(request, principal):
        await client.delete_session(_namespace(shared, principal), name)
    if shared.sessions_cache is not None:
        shared.sessions_cache.forget(_namespace(shared, principal), name)
    return Response(status_code=204)


async def _set_suspend(request: Request, principal: Principal, shared: Services, client: Kube, name: str,
                       suspend: bool) -> SessionView:
    audit_target(request, f"session/{name}")
    await _owned(client, shared, principal, name)
    async with audited_transaction(request, principal):
        # Either way the operator's idleness reason goes: a user's suspend sticks (no message resumes it).
        traced = _traced().get("annotations", {})
        change = {"metadata": {"annotations": {**traced, SUSPEND_REASON_ANNOTATION: None}},
                  "spec": {"lifecycle": {"suspend": suspend}}}
        patched = await client.patch_session(_namespace(shared, principal), name, change)
    return _view(_written(shared, patched))


@router.post("/{name}/suspend", response_model=SessionView, name="session.suspend",
             responses=problem_responses(401, 403, 404, 422, *KUBE_PROBLEMS))
async def suspend_session(name: SessionName, request: Request, principal: Principal = Depends(tenant_member),
                          shared: Services = Depends(services), client: Kube = Depends(kube)) -> SessionView:
    return await _set_suspend(request, principal, shared, client, name, True)


@router.post("/{name}/resume", response_model=SessionView, name="session.resume",
             responses=problem_responses(401, 403, 404, 422, *KUBE_PROBLEMS))
async def resume_session(name: SessionName, request: Request, principal: Principal = Depends(tenant_member),
                         shared: Services = Depends(services), client: Kube = Depends(kube)) -> SessionView:
    return await _set_suspend(request, principal, shared, client, name, False)


# The runner proxy -------------------------------------------------------------------------------------

def _runner(shared: Services) -> RunnerClient:
    if shared.runner is None:
        raise ProblemError(503, "Service Unavailable", "the runner client is not configured")
    return shared.runner


async def _runner_target(client: Kube, shared: Services, principal: Principal, name: str) -> tuple[str, str]:
    session = await _owned(client, shared, principal, name)
    phase = (session.get("status") or {}).get("phase") or "Pending"
    base_url = _runner(shared).base_url(session)
    if not _ready(session) or base_url is None:
        raise ProblemError(409, "Conflict", f"session {name!r} is not ready (phase {phase})")
    try:
        token = await client.runner_token(_namespace(shared, principal), session)
    except KubeError as exc:
        raise kube_problem(exc) from exc
    if token is None:
        raise ProblemError(409, "Conflict", f"session {name!r} has no runner token yet")
    await _touch(client, shared, _namespace(shared, principal), session)
    return base_url, token


def _activity_interval(session: dict[str, Any]) -> float:
    """How often activity is recorded: every 30 s, or often enough for a shorter idleTimeout to see it."""
    idle_timeout = ((session.get("spec") or {}).get("lifecycle") or {}).get("idleTimeout")
    if not idle_timeout:
        return ACTIVITY_PATCH_INTERVAL
    return min(ACTIVITY_PATCH_INTERVAL, parse_duration(idle_timeout).total_seconds() / 4)


async def _touch(client: Kube, shared: Services, namespace: str, session: dict[str, Any], *,
                 always: bool = False) -> None:
    """Record activity on the AgentSession (the operator's idle timeout reads it), at most every interval
    unless `always`."""
    name = session["metadata"]["name"]
    last_patched: dict[tuple[str, str], float] = shared.extras.setdefault("activity_patched", {})
    now, interval = time.monotonic(), _activity_interval(session)
    if not always and now - last_patched.get((namespace, name), -interval) < interval:
        return
    last_patched[(namespace, name)] = now
    try:
        _written(shared, await client.patch_session(
            namespace, name, {"metadata": {"annotations": {LAST_ACTIVITY_ANNOTATION: _stamp()}}}))
    except KubeError:
        log.warning("could not record session activity", extra={"session": name})


def _stamp() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _suspended_for_idleness(session: dict[str, Any]) -> bool:
    annotations = session["metadata"].get("annotations") or {}
    return annotations.get(SUSPEND_REASON_ANNOTATION) == Reason.IDLE_TIMEOUT_REACHED


async def _resume_for_message(request: Request, client: Kube, shared: Services, principal: Principal,
                              session: dict[str, Any]) -> bool:
    """A session the operator suspended for idleness is resumed by its next message: clear the suspend,
    its reason and restart the idle clock in one write, then wait (bounded) for it to be Ready. A user's
    suspend sticks: 409. Returns whether it resumed the session."""
    name = session["metadata"]["name"]
    if not (session.get("spec") or {}).get("lifecycle", {}).get("suspend"):
        return False
    if not _suspended_for_idleness(session):
        raise ProblemError(409, "Conflict", f"session {name!r} is suspended (spec.lifecycle.suspend, set by "
                           f"a user): POST /api/v1/sessions/{name}/resume first")
    namespace = _namespace(shared, principal)
    audit_details(request, resumed=str(Reason.IDLE_TIMEOUT_REACHED))
    try:
        _written(shared, await client.patch_session(namespace, name, {
            "metadata": {"annotations": {SUSPEND_REASON_ANNOTATION: None,
                                         LAST_ACTIVITY_ANNOTATION: _stamp()}},
            "spec": {"lifecycle": {"suspend": False}}}))
    except KubeError as exc:
        raise kube_problem(exc) from exc
    shared.extras.setdefault("activity_patched", {})[(namespace, name)] = time.monotonic()
    await _until_ready(client, shared, principal, name)
    return True


async def _until_ready(client: Kube, shared: Services, principal: Principal, name: str) -> None:
    timeout = shared.settings.resume_timeout_seconds
    deadline = time.monotonic() + timeout
    while True:
        session = await _owned(client, shared, principal, name)
        if _ready(session) and _runner(shared).base_url(session) is not None:
            return
        status = session.get("status") or {}
        phase = status.get("phase") or "Pending"
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
        if phase in STUCK_PHASES:
            raise ProblemError(503, "Service Unavailable", f"session {name!r} was resumed but is {phase}: "
                               f"{ready.get('reason', '')}: {ready.get('message', '')}".rstrip(": "))
        if time.monotonic() >= deadline:
            raise ProblemError(504, "Gateway Timeout", f"session {name!r} was resumed but is not ready after "
                               f"{timeout:g} s (phase {phase}); send the message again shortly",
                               headers={"Retry-After": "5"})
        await asyncio.sleep(RESUME_POLL_SECONDS)


async def _proxy(shared: Services, base_url: str, token: str, method: str, path: str,
                 body: Any = None) -> dict[str, Any]:
    try:
        response = await _runner(shared).call(base_url, token, method, path, json=body)
    except RunnerUnavailable as exc:
        raise ProblemError(502, "Bad Gateway", str(exc)) from exc
    if response.status_code >= 400:
        raise ProblemError(409, "Conflict", f"the session's runner refused: {response.text[:300]}")
    try:
        payload = response.json()
    except ValueError as exc:
        raise ProblemError(502, "Bad Gateway", "the session's runner answered with non-JSON") from exc
    if not isinstance(payload, dict):
        raise ProblemError(502, "Bad Gateway", "the session's runner answered with an unexpected shape")
    return payload


@contextlib.asynccontextmanager
async def _kept_active(client: Kube, shared: Services, namespace: str,
                       session: dict[str, Any]) -> AsyncIterator[None]:
    """A message on its way is activity: while it waits (for a resumed pod, for the agent to take it) the
    idle clock must not run out under it, so activity is recorded every interval until it is delivered."""
    async def keep() -> None:
        while True:
            await asyncio.sleep(_activity_interval(session))
            await _touch(client, shared, namespace, session)

    async with background_task("session-activity", keep()):
        yield


def _follow_turn(client: Kube, shared: Services, namespace: str, session: dict[str, Any], base_url: str,
                 token: str) -> None:
    """The agent's work is activity too, not only calls to the API: while the turn a message started runs,
    the runner's /status is asked every activity interval and activity recorded, once more when it ends
    (the idle clock starts there). Only for sessions with an idleTimeout, the one reader of activity."""
    if not ((session.get("spec") or {}).get("lifecycle") or {}).get("idleTimeout"):
        return

    async def while_it_runs() -> None:
        deadline = time.monotonic() + TURN_FOLLOW_MAX_SECONDS
        running = True
        while running and time.monotonic() < deadline:
            await asyncio.sleep(_activity_interval(session))
            try:
                response = await _runner(shared).call(base_url, token, "GET", "/status")
                running = response.json().get("status") == "running"
            except (RunnerUnavailable, ProblemError, ValueError, AttributeError):
                return  # the pod went (suspended, deleted) or answers nonsense: nothing left to follow
            await _touch(client, shared, namespace, session, always=not running)

    followers: set[asyncio.Task[None]] = shared.extras.setdefault("turn_followers", set())
    task = asyncio.create_task(while_it_runs())
    followers.add(task)  # a reference, so the task is not collected mid-turn
    task.add_done_callback(followers.discard)


async def _deliver_after_resume(shared: Services, base_url: str, token: str,
                                body: MessageBody) -> dict[str, Any]:
    """The first message to a pod just resumed: Ready can come a moment before its port is reachable
    through the Kubernetes API (port-forward transport), so a pod not reachable yet (503) is tried again
    until the resume bound. Any other answer or failure is the caller's, as for every message."""
    deadline = time.monotonic() + shared.settings.resume_timeout_seconds
    while True:
        try:
            return await _proxy(shared, base_url, token, "POST", "/message", body.model_dump())
        except ProblemError as problem:
            if problem.status != 503 or time.monotonic() >= deadline:
                raise
        await asyncio.sleep(RESUME_POLL_SECONDS)


@router.post("/{name}/message", response_model=dict[str, Any], name="session.message",
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 502, 503, 504))
async def send_message(name: SessionName, body: MessageBody, request: Request,
                       principal: Principal = Depends(tenant_member), shared: Services = Depends(services),
                       client: Kube = Depends(kube)) -> dict[str, Any]:
    """Deliver a message to the session's agent; a session suspended for idleness is resumed first (the
    call then waits for it to be Ready, up to AGENTBOX_RESUME_TIMEOUT_SECONDS)."""
    audit_target(request, f"session/{name}", message_type=body.type, message_chars=len(body.content))
    session = await _owned(client, shared, principal, name)
    namespace = _namespace(shared, principal)
    async with _kept_active(client, shared, namespace, session):
        resumed = await _resume_for_message(request, client, shared, principal, session)
        base_url, token = await _runner_target(client, shared, principal, name)
        # No transaction around the runner call (up to the runner timeout, or the resume bound): the
        # success row follows in a short one; a failure's row is AuditedRoute's.
        if resumed:
            answer = await _deliver_after_resume(shared, base_url, token, body)
        else:
            answer = await _proxy(shared, base_url, token, "POST", "/message", body.model_dump())
    await audit_success(request, principal)
    _follow_turn(client, shared, namespace, session, base_url, token)
    return answer


@router.get("/{name}/messages", response_model=dict[str, Any],
            responses=problem_responses(401, 403, 404, 409, 422, 502, 503))
async def get_messages(name: SessionName, principal: Principal = Depends(tenant_member),
                       shared: Services = Depends(services), client: Kube = Depends(kube)) -> dict[str, Any]:
    base_url, token = await _runner_target(client, shared, principal, name)
    return await _proxy(shared, base_url, token, "GET", "/messages")


@router.get("/{name}/status", response_model=RunnerStatus,
            responses=problem_responses(401, 403, 404, 409, 422, 502, 503))
async def get_status(name: SessionName, principal: Principal = Depends(tenant_member),
                     shared: Services = Depends(services), client: Kube = Depends(kube)) -> RunnerStatus:
    base_url, token = await _runner_target(client, shared, principal, name)
    payload = await _proxy(shared, base_url, token, "GET", "/status")
    try:
        return RunnerStatus.model_validate(payload)
    except ValidationError as exc:
        raise ProblemError(502, "Bad Gateway", "the session's runner answered an invalid status") from exc


@router.get("/{name}/events", response_class=StreamingResponse,
            responses={200: {"description": "Server-sent events from the session's runner",
                             "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                       **problem_responses(401, 403, 404, 409, 422, 502, 503)})
async def stream_events(name: SessionName, principal: Principal = Depends(tenant_member),
                        shared: Services = Depends(services),
                        client: Kube = Depends(kube)) -> StreamingResponse:
    base_url, token = await _runner_target(client, shared, principal, name)
    try:
        stream = await _runner(shared).events(base_url, token)
    except RunnerUnavailable as exc:
        raise ProblemError(502, "Bad Gateway", str(exc)) from exc
    return StreamingResponse(stream, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
