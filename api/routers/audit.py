"""The audit log of the caller's org (admins): filtered, cursor-paginated reads and chain verification.
While the app runs, a background task keeps the audit table's monthly partitions created ahead of time
(at start-up, then every AGENTBOX_AUDIT_PARTITION_INTERVAL_SECONDS, a day by default): without next
month's partition, every audited request would fail when the month turns."""

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
from agentbox.api.app import Services
from agentbox.api.auth import Principal, authenticate
from agentbox.api.db import DatabaseUnavailable
from agentbox.api.problems import ProblemError, problem_responses
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


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    shared: Services = app.state.services
    async with background_task("audit-partitions",
                               keep_partitions(shared) if shared.database is not None else None):
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


class ChainReportView(ApiModel):
    ok: bool
    rows_checked: int
    head_seq: int | None
    first_broken: ChainBreakView | None


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
        raise ProblemError(400, "Bad Request", "cursor: not a cursor this API issued") from exc


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


@router.get("/verify", response_model=ChainReportView, responses=problem_responses(401, 403, 503))
async def verify_audit(request: Request, principal: Principal = Depends(_reader)) -> ChainReportView:
    report = await audit.verify_chain(database(request), None if principal.is_platform else principal.org)
    broken = report.first_broken
    return ChainReportView(ok=report.ok, rows_checked=report.rows_checked, head_seq=report.head_seq,
                           first_broken=None if broken is None else ChainBreakView(
                               seq=broken.seq, id=broken.id, reason=broken.reason))
