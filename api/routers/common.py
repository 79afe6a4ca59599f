"""What every resource router shares: database access as problems, and one audit row per mutating request.

Mutating routes use `AuditedRoute`. The route's own work happens inside `audited_transaction`, which
writes the success row last in the same transaction as the change; if anything fails before that
transaction commits (validation, authorisation, a 404, Kubernetes, the database), the route class writes
one `denied` or `failed` row in a transaction of its own. Either way: exactly one row.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentbox.api import audit
from agentbox.api.app import Services
from agentbox.api.auth import InvalidToken, KeysUnavailable, Principal
from agentbox.api.crypto import KeyConfigError, KeyRing
from agentbox.api.db import Database, DatabaseUnavailable
from agentbox.api.kube import KubeError
from agentbox.api.observability import current_request_id
from agentbox.api.problems import NUL_MESSAGE, UNSTORABLE_TEXT, ProblemError

log = logging.getLogger("agentbox.api.audit")
MUTATING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def key_ring(shared: Services) -> KeyRing:
    """The app's credential key ring, parsed once; a 503 problem while the keys are unusable."""
    ring = shared.extras.get("key_ring")
    if ring is None:
        try:
            ring = shared.extras["key_ring"] = KeyRing.parse(shared.settings.encryption_keys)
        except KeyConfigError as exc:
            log.error("credential encryption is not usable: %s", exc)
            raise ProblemError(503, "Service Unavailable",
                               "credential encryption is not configured (AGENTBOX_ENCRYPTION_KEYS)") from exc
    return ring


@asynccontextmanager
async def background_task(name: str, work: Coroutine[Any, Any, None] | None) -> AsyncIterator[None]:
    """Run `work` (when there is any) for as long as the block lasts, and cancel it on the way out: the
    shape of a router lifespan that keeps something fresh in the background."""
    task = asyncio.create_task(work, name=name) if work is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@dataclass
class AuditState:
    action: str
    target: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    committed: bool = False


def _state(request: Request) -> AuditState | None:
    return getattr(request.state, "audit", None)


def audit_target(request: Request, target: str, **details: Any) -> None:
    """Name what the request acts on (and facts worth keeping), for whichever row ends up written."""
    state = _state(request)
    if state is not None:
        state.target = target
        state.details.update(details)


def audit_details(request: Request, **details: Any) -> None:
    state = _state(request)
    if state is not None:
        state.details.update(details)


def database(request: Request) -> Database:
    db = request.app.state.services.database
    if db is None:
        raise ProblemError(503, "Service Unavailable", "the database is not configured")
    return db


def _event(request: Request, principal: Principal, state: AuditState, outcome: audit.Outcome,
           reason: str | None) -> audit.AuditEvent:
    return audit.AuditEvent(
        org_id=None if principal.is_platform else principal.org,  # the platform's acts: its own chain
        action=state.action, outcome=outcome, actor_sub=principal.sub,
        actor_role="service_role" if principal.is_platform else principal.role, target=state.target,
        reason=reason, ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"), request_id=current_request_id(),
        details=state.details)


@asynccontextmanager
async def audited_transaction(request: Request, principal: Principal,
                              org: str | None = None) -> AsyncIterator[asyncpg.Connection]:
    """A tenant transaction (the platform's when the principal is the service role; with `org`, the
    platform acting on that org) whose last statement is this request's success row."""
    db = database(request)
    state = _state(request)
    context = db.platform(org) if principal.is_platform else db.tenant(principal.org or "")
    try:
        async with context as conn:
            yield conn
            if state is not None:
                await audit.record(conn, _event(request, principal, state, "success", None))
        if state is not None:
            state.committed = True
            request.app.state.services.metrics.audit_writes.labels("success").inc()
    except KubeError as exc:
        raise kube_problem(exc) from exc


async def audit_success(request: Request, principal: Principal) -> None:
    """The success row alone, in a short transaction of its own: for a request whose work is done outside
    the database and may take long (a call to a session's runner), so no pooled connection waits on it."""
    async with audited_transaction(request, principal):
        pass


def _outcome(exc: BaseException) -> tuple[audit.Outcome, str]:
    if isinstance(exc, ProblemError):
        status, reason = exc.status, exc.detail or exc.title
    elif isinstance(exc, StarletteHTTPException):
        status, reason = exc.status_code, str(exc.detail)
    elif isinstance(exc, UNSTORABLE_TEXT):
        status, reason = 422, f"a text value {NUL_MESSAGE}"
    elif isinstance(exc, DatabaseUnavailable):
        status, reason = 503, str(exc)
    elif isinstance(exc, RequestValidationError):
        fields = sorted({".".join(str(p) for p in error.get("loc", ())) for error in exc.errors()})
        status, reason = 422, f"invalid request: {', '.join(fields)}"
    else:
        status, reason = 500, type(exc).__name__
    return ("denied" if status in (401, 403, 404) else "failed"), f"{status}: {reason}"


class AuditedRoute(APIRoute):
    """A route whose mutating requests always leave exactly one audit row (when the caller is known).

    The route's `name` is the audit action (e.g. `session.create`). Unauthenticated requests are logged,
    not audited: they belong to no org, and writing them would let anyone grow the platform's chain."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        action = self.name

        async def audited_handler(request: Request) -> Response:
            if request.method not in MUTATING_METHODS:
                return await handler(request)
            request.state.audit = state = AuditState(action=action)
            try:
                response = await handler(request)
            except Exception as exc:
                if not state.committed:
                    await _record_failure(request, state, *_outcome(exc))
                raise
            if not state.committed:
                await _record_failure(request, state, "success" if response.status_code < 400 else "failed",
                                      None)
            return response

        return audited_handler


async def _record_failure(request: Request, state: AuditState, outcome: audit.Outcome,
                          reason: str | None) -> None:
    principal: Principal | None = getattr(request.state, "principal", None) or await _caller(request)
    db: Database | None = request.app.state.services.database
    # A valid token that names no org still has an author: its refusal goes into the platform's chain.
    if principal is None or db is None:
        log.info("unaudited request", extra={"action": state.action, "outcome": outcome, "reason": reason})
        return
    try:
        await audit.record(db, _event(request, principal, state, outcome, reason))
        request.app.state.services.metrics.audit_writes.labels(outcome).inc()
    except (DatabaseUnavailable, asyncpg.PostgresError, ValueError):
        log.exception("could not write the audit row", extra={"action": state.action, "outcome": outcome})


async def _caller(request: Request) -> Principal | None:
    """Who sent a request that failed before authentication ran (a body that is not JSON, say)."""
    verifier = request.app.state.services.verifier
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if verifier is None or scheme.lower() != "bearer" or not token:
        return None
    try:
        return await verifier.verify(token.strip())
    except (InvalidToken, KeysUnavailable):
        return None


# What kube_problem answers beside the caller's own faults: a conflict, the control plane refused (502),
# Kubernetes unavailable (503). For the OpenAPI responses of routes that call Kubernetes.
KUBE_PROBLEMS = (409, 502, 503)


def kube_problem(exc: KubeError) -> ProblemError:
    if exc.status in (401, 403):
        return ProblemError(502, "Bad Gateway", "the control plane refused the Kubernetes request")
    if exc.status == 409:
        return ProblemError(409, "Conflict", exc.reason)
    if exc.status == 422:
        return ProblemError(422, "Unprocessable Content", f"Kubernetes rejected the object: {exc.reason}")
    logging.getLogger("agentbox.api.kube").warning("Kubernetes failed the request",
                                                   extra={"status": exc.status, "reason": exc.reason})
    return ProblemError(503, "Service Unavailable", "Kubernetes is unavailable; retry shortly",
                        headers={"Retry-After": "2"})


def tenant_kube_problem(exc: KubeError, namespace: str) -> ProblemError:
    """kube_problem for a write into an org's tenant namespace, where a 404 means the namespace is missing:
    the organisation was never provisioned (POST /api/v1/orgs), which no retry mends."""
    if exc.status == 404:
        return ProblemError(409, "Conflict", f"the organisation is not provisioned: its namespace "
                                             f"{namespace} does not exist")
    return kube_problem(exc)


def kube(request: Request) -> Any:
    client = request.app.state.services.kube
    if client is None:
        raise ProblemError(503, "Service Unavailable", "Kubernetes is not configured")
    return client
