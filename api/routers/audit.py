"""The audit log of the caller's org (admins): filtered, cursor-paginated reads, chain verification, and
the chain's latest signed checkpoint. While the app runs, background tasks keep the audit table's monthly
partitions created ahead of time (at start-up, then every AGENTBOX_AUDIT_PARTITION_INTERVAL_SECONDS, a
day by default: without next month's partition, every audited request would fail when the month turns)
and, with a signing key, sign each chain's head every AGENTBOX_AUDIT_CHECKPOINT_INTERVAL_SECONDS
(agentbox.api.audit_checkpoints)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import asyncpg
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import AfterValidator

from agentbox.api import audit
from agentbox.api.app import Services, services
from agentbox.api.audit_checkpoints import CheckpointError, Checkpoints, key_id, public_key_text
from agentbox.api.auth import Principal, authenticate
from agentbox.api.db import DatabaseUnavailable
from agentbox.api.problems import FieldError, ProblemError, problem_responses
from agentbox.api.routers.common import audited_transaction, background_task, database
from agentbox.api.routers.models import ApiModel

log = logging.getLogger("agentbox.api.audit")
PARTITION_RETRY_SECONDS = 60.0  # after a failed attempt (PostgreSQL down at start-up, say)


async def keep_partitions(shared: Services) -> None:
    """Create the coming months' audit partitions now and then every interval, for as long as it runs."""
    while True:
        try:
            await audit.ensure_partitions(shared.database)
            delay = shared.settings.audit_partition_interval_seconds
        except (DatabaseUnavailable, asyncpg.PostgresError):
            log.warning("could not create the coming audit partitions; retrying", exc_info=True)
            delay = min(PARTITION_RETRY_SECONDS, shared.settings.audit_partition_interval_seconds)
        await asyncio.sleep(delay)


async def keep_checkpoints(shared: Services, checkpoints: Checkpoints) -> None:
    """Sign the chains' heads now and then every interval, for as long as it runs."""
    interval = shared.settings.audit_checkpoint_interval_seconds
    while True:
        try:
            await checkpoints.take(shared.database)
            delay = interval
        except (DatabaseUnavailable, asyncpg.PostgresError, OSError):
            log.warning("could not take the audit checkpoints; retrying", exc_info=True)
            delay = min(PARTITION_RETRY_SECONDS, interval)
        await asyncio.sleep(delay)


def checkpoints(shared: Services) -> Checkpoints:
    """The app's audit checkpoints, built once from settings (by the lifespan, when there is one); a 503
    problem while they are misconfigured."""
    built = shared.extras.get("audit_checkpoints")
    if built is None:
        try:
            built = shared.extras["audit_checkpoints"] = Checkpoints.from_settings(shared.settings)
        except CheckpointError as exc:
            log.error("audit checkpoints are not usable: %s", exc)
            raise ProblemError(503, "Service Unavailable",
                               f"audit checkpoints are misconfigured: {exc}") from exc
    return built


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    shared: Services = app.state.services
    # Built here first, so a malformed key stops the start instead of leaving the chains unsigned.
    configured = shared.extras["audit_checkpoints"] = Checkpoints.from_settings(shared.settings)
    if configured.keys.signing is not None:  # what anyone checking a checkpoint needs, and nothing more
        public = configured.keys.signing.public_key()
        log.info("audit checkpoints are signed with key %s", key_id(public),
                 extra={"key_id": key_id(public), "public_key": public_key_text(public)})
    with_database = shared.database is not None
    async with background_task("audit-partitions", keep_partitions(shared) if with_database else None), \
            background_task("audit-checkpoints", keep_checkpoints(shared, configured)
                            if with_database and configured.signing else None):
        yield


router = APIRouter(prefix="/api/v1/audit", tags=["audit"], lifespan=_lifespan)


class AuditEntry(ApiModel):
    id: int
    seq: int
    created_at: datetime
    actor_sub: str | None
    actor_role: str | None
    action: str
    target: str | None
    outcome: str
    reason: str | None
    ip: str | None
    user_agent: str | None
    request_id: str | None
    details: dict[str, Any]


class AuditPage(ApiModel):
    items: list[AuditEntry]
    next_cursor: str | None


class ChainBreakView(ApiModel):
    seq: int
    id: int | None
    reason: str


class CheckpointRef(ApiModel):
    seq: int
    signed_at: datetime


class ChainReportView(ApiModel):
    ok: bool
    rows_checked: int
    head_seq: int | None
    first_broken: ChainBreakView | None
    # The newest signed checkpoint the chain was held to (the stored one, or the one given); null: none.
    checkpoint: CheckpointRef | None


class CheckpointView(ApiModel):
    seq: int
    hash: str
    signed_at: datetime
    key_id: str
    # The signed checkpoint itself (a JWT, EdDSA): keep it, and hand it back to /verify?checkpoint= later.
    token: str


def _reader(principal: Principal = Depends(authenticate)) -> Principal:
    """Org admins read their org's chain; the platform operator reads the platform's own."""
    if principal.is_platform:
        return principal
    if principal.org is None or not principal.is_admin:
        raise ProblemError(403, "Forbidden", "the audit log is for org admins")
    return principal


def _cursor_seq(cursor: str | None) -> int | None:
    if cursor is None:
        return None
    try:
        return int(base64.urlsafe_b64decode(cursor.encode() + b"==").decode())
    except (binascii.Error, ValueError, UnicodeDecodeError) as exc:
        message = "not a cursor this API issued"
        raise ProblemError(400, "Bad Request", f"cursor: {message}", errors=[
            FieldError(field="query.cursor", message=message, type="value_error")]) from exc


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(str(seq).encode()).decode().rstrip("=")


def _in_utc(moment: datetime) -> datetime:
    """The moment in UTC (a time without an offset is taken as UTC); one whose UTC date leaves years
    1-9999 (0001-01-01T00:00+01:00, say) cannot be compared with a timestamp, so it is refused."""
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise ValueError("is out of range once converted to UTC") from None


Moment = Annotated[datetime, AfterValidator(_in_utc)]


@router.get("", response_model=AuditPage, responses=problem_responses(400, 401, 403, 422, 503))
async def list_audit(request: Request, principal: Principal = Depends(_reader),
                     action: Annotated[str | None, Query(max_length=128)] = None,
                     actor: Annotated[str | None, Query(max_length=255)] = None,
                     since: Moment | None = None, until: Moment | None = None,
                     cursor: Annotated[str | None, Query(max_length=64)] = None,
                     limit: Annotated[int, Query(ge=1, le=500)] = 100) -> AuditPage:
    """Newest first. `nextCursor` continues the listing where this page ended."""
    filters = ["org_id IS NOT DISTINCT FROM $1"]
    args: list[Any] = [None if principal.is_platform else principal.org]
    for clause, value in (("action = ${}", action), ("actor_sub = ${}", actor), ("created_at >= ${}", since),
                          ("created_at < ${}", until), ("seq < ${}", _cursor_seq(cursor))):
        if value is not None:
            args.append(value)
            filters.append(clause.format(len(args)))
    args.append(limit + 1)
    async with audited_transaction(request, principal) as conn:
        rows = await conn.fetch(
            "SELECT id, seq, created_at, actor_sub, actor_role, action, target, outcome, reason, "  # noqa: S608
            "host(ip) AS ip, user_agent, request_id, details::text AS details FROM audit_logs "
            f"WHERE {' AND '.join(filters)} ORDER BY seq DESC LIMIT ${len(args)}", *args)
    items = [AuditEntry(**{**dict(row), "details": json.loads(row["details"])}) for row in rows[:limit]]
    return AuditPage(items=items, next_cursor=_cursor(items[-1].seq) if len(rows) > limit else None)


@router.get("/verify", response_model=ChainReportView, responses=problem_responses(401, 403, 422, 503))
async def verify_audit(request: Request, principal: Principal = Depends(_reader),
                       shared: Services = Depends(services),
                       checkpoint: Annotated[str | None, Query(max_length=4096)] = None) -> ChainReportView:
    """Walk the chain and hold it to its latest stored checkpoint and to `checkpoint`, a signed checkpoint
    the caller kept (from GET /api/v1/audit/checkpoint or the API's log)."""
    org = None if principal.is_platform else principal.org
    configured = checkpoints(shared)
    pinned: list[audit.Checkpoint] = []
    try:
        if (stored := await configured.latest(org)) is not None:
            pinned.append(stored.checkpoint)
    except CheckpointError as exc:  # the report then names no checkpoint: the caller can pass their own
        log.error("verifying without it: %s", exc)
    if checkpoint is not None:
        try:
            pinned.append(configured.keys.verify(checkpoint, org).checkpoint)
        except CheckpointError as exc:
            raise ProblemError(422, "Unprocessable Content", f"query.checkpoint: {exc}", errors=[
                FieldError(field="query.checkpoint", message=str(exc), type="value_error")]) from exc
    report = await audit.verify_chain(database(request), org, pinned)
    broken, held_to = report.first_broken, report.checkpoint
    return ChainReportView(ok=report.ok, rows_checked=report.rows_checked, head_seq=report.head_seq,
                           first_broken=None if broken is None else ChainBreakView(
                               seq=broken.seq, id=broken.id, reason=broken.reason),
                           checkpoint=None if held_to is None else CheckpointRef(seq=held_to.seq,
                                                                                 signed_at=held_to.at))


@router.get("/checkpoint", response_model=CheckpointView, responses=problem_responses(401, 403, 404, 503))
async def latest_checkpoint(principal: Principal = Depends(_reader),
                            shared: Services = Depends(services)) -> CheckpointView:
    """The latest signed checkpoint of the caller's chain, read from outside the database."""
    org = None if principal.is_platform else principal.org
    configured = checkpoints(shared)
    try:
        latest = await configured.latest(org)
    except CheckpointError as exc:
        log.error("%s", exc)
        raise ProblemError(404, "Not Found", "the stored checkpoint of this chain does not verify") from exc
    if latest is None:
        raise ProblemError(404, "Not Found", "no signed checkpoint of this chain yet" if configured.store
                           else "audit checkpoints are not kept here (AGENTBOX_AUDIT_CHECKPOINT_DIR)")
    return CheckpointView(seq=latest.checkpoint.seq, hash=latest.checkpoint.hash.hex(),
                          signed_at=latest.checkpoint.at, key_id=latest.key_id, token=latest.token)
