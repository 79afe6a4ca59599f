"""The audit log: write one row per event, verify an org's hash chain.

    event = AuditEvent(org_id="acme", action="mcp.configuration.create", outcome="success",
                       actor_sub=principal.sub, actor_role="admin", target=f"mcp_configuration/{id}",
                       ip=client_ip, user_agent=ua, request_id=rid, details={"name": "github"})
    async with db.tenant("acme") as conn:
        ...the change...
        await record(conn, event)          # same transaction: the row exists exactly when the change does
    await record(db, denied_event)         # no transaction of the caller's: its own

The database assigns seq, prev_hash and hash (audit_append and its trigger, migrations/0004_audit.sql);
this module never computes a chain link, it only checks them. Details pass through `redact` first:
secret-looking keys and values (tokens, keys, passwords, our own ciphertexts) are replaced, so none
reaches the log.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import asyncpg

from agentbox.api.db import Database, check_org_id

Outcome = Literal["success", "denied", "failed"]
OUTCOMES = ("success", "denied", "failed")
REDACTED = "[REDACTED]"
GENESIS_HASH = bytes(32)

# Keys whose values are secrets whatever they hold.
_SECRET_KEY = re.compile(
    r"token|secret|passw|authori[sz]ation|cookie|credential|private.?key|api.?key|verifier|bearer|signature"
    r"|^(key|keys|code|auth|jwt|dsn|encryption_keys)$",
    re.IGNORECASE,
)
# Values that are secrets wherever they appear: JWTs, bearer headers, our ciphertexts, well-known token
# shapes, passwords inside connection URLs.
_SECRET_VALUE = re.compile(
    r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"
    r"|(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{8,}"
    r"|v1:[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_-]{16,}"
    r"|\b(?:gh[pousr]_|github_pat_|sk-|xox[abpr]-|glpat-)[A-Za-z0-9_-]{16,}"
    r"|(?<=://)[^/@\s:]+:[^/@\s]+(?=@)"
)
_MAX_DEPTH = 8


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of `value` (JSON-like) with secret-named keys and secret-shaped strings replaced."""
    if _depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {scrub(str(key)): REDACTED if _SECRET_KEY.search(str(key)) else redact(item, _depth + 1)
                for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [redact(item, _depth + 1) for item in value]
    if isinstance(value, str):
        return scrub(value)
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub(str(value))


def scrub(text: str) -> str:
    """`text` with secret-shaped substrings replaced, and NUL (which PostgreSQL's text and jsonb refuse,
    failing the whole row) shown as U+FFFD."""
    return _SECRET_VALUE.sub(REDACTED, text).replace("\x00", "\ufffd")


@dataclass(frozen=True)
class AuditEvent:
    """One audited act. `org_id` None is the platform's own chain (for example creating a global prompt)."""

    org_id: str | None
    action: str
    outcome: Outcome
    actor_sub: str | None = None
    actor_role: str | None = None
    target: str | None = None
    reason: str | None = None
    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {self.outcome!r}")
        if not self.action:
            raise ValueError("action must not be empty")
        if self.org_id is not None:
            check_org_id(self.org_id)


@dataclass(frozen=True)
class AuditRecord:
    id: int
    seq: int
    created_at: datetime
    hash: str


# migrations/0004_audit.sql: the function sets the context itself when asked to ($1), then inserts.
_APPEND = """
SELECT id, seq, created_at, encode(hash, 'hex') AS hash
  FROM audit_append($1, $2, $3, $4, $5, $6, $7, $8, $9::inet, $10, $11, $12::jsonb)
"""


async def record(where: asyncpg.Connection | Database, event: AuditEvent) -> AuditRecord:
    """Append `event`. Given a connection, inside the caller's open transaction (whose context must
    cover event.org_id); given the Database, in a transaction of its own, one round trip."""
    if isinstance(where, Database):
        async with where.connection() as conn:
            return await _append(conn, event, own_transaction=True)
    if not where.is_in_transaction():
        raise RuntimeError("audit.record needs a connection inside a tenant or platform transaction")
    return await _append(where, event, own_transaction=False)


async def _append(conn: asyncpg.Connection, event: AuditEvent, *, own_transaction: bool) -> AuditRecord:
    row = await conn.fetchrow(
        _APPEND, own_transaction, event.org_id, event.actor_sub, event.actor_role, event.action,
        _text(event.target), event.outcome, _text(event.reason, 2000), _address_or_none(event.ip),
        _text(event.user_agent, 1024), event.request_id,
        json.dumps(redact(dict(event.details)), default=str),
    )
    return AuditRecord(id=row["id"], seq=row["seq"], created_at=row["created_at"], hash=row["hash"])


def _text(value: str | None, limit: int | None = None) -> str | None:
    return scrub(value)[:limit] if value else None


def _address_or_none(ip: str | None) -> str | None:
    # Test clients and some proxies report names like "testclient": an audit row must not fail on them.
    try:
        return str(ipaddress.ip_address(ip)) if ip else None
    except ValueError:
        return None


@dataclass(frozen=True)
class ChainBreak:
    """The first row where the chain does not hold, and why. `id` is None when the row is missing."""

    seq: int
    id: int | None
    reason: str


@dataclass(frozen=True)
class Checkpoint:
    """A chain's head as it stood when it was signed outside the database (agentbox.api.audit_checkpoints).
    The verifier holds the chain to it: the row at `seq` must still be there, with this hash."""

    org_id: str | None
    seq: int
    hash: bytes
    at: datetime


@dataclass(frozen=True)
class ChainReport:
    org_id: str | None
    rows_checked: int
    head_seq: int | None
    first_broken: ChainBreak | None
    checkpoint: Checkpoint | None = None  # the newest checkpoint the chain was held to

    @property
    def ok(self) -> bool:
        return self.first_broken is None


_CHAIN_ROWS = """
SELECT id, seq, prev_hash, hash,
       audit_canonical(id, org_id, seq, created_at, actor_sub, actor_role, action, target, outcome, reason,
                       ip, user_agent, request_id, details) AS canonical
  FROM audit_logs
 WHERE org_id IS NOT DISTINCT FROM $1 AND seq > $2 AND seq <= $3
 ORDER BY seq
"""


def _context(db: Database, org_id: str | None) -> AbstractAsyncContextManager[asyncpg.Connection]:
    return db.platform() if org_id is None else db.tenant(org_id)


async def verify_chain(db: Database, org_id: str | None,
                       checkpoints: Iterable[Checkpoint] = ()) -> ChainReport:
    """Walk `org_id`'s chain (None: the platform's) from its start or retention anchor to its head, and
    report the first row that was edited, removed, reordered or forked. Given trusted `checkpoints` of
    the chain, also report a chain that no longer reaches one (its newest rows removed and its head moved
    back) or whose row at a checkpoint's seq has another hash (rewritten): the chain alone cannot show
    either, since whoever controls the database can make what is left consistent again."""
    pinned = [checkpoint for checkpoint in checkpoints if checkpoint.org_id == org_id]
    newest = max(pinned, key=lambda checkpoint: checkpoint.seq, default=None)
    async with _context(db, org_id) as conn:
        # The head first: rows committed after it have larger seq and are left for the next run.
        state = await conn.fetchrow("SELECT * FROM audit_chain_state()")
        if state is None or state["head_seq"] is None:
            return ChainReport(org_id, 0, None, _short_of(newest, 0), newest)
        anchor_seq = state["anchor_seq"] or 0
        expected_prev = bytes(state["anchor_hash"]) if state["anchor_hash"] is not None else GENESIS_HASH
        head_seq, head_hash = state["head_seq"], bytes(state["head_hash"])
        # Checkpoints before the retention anchor went with their archived partition; one at the anchor
        # is held to it.
        for checkpoint in pinned:
            if checkpoint.seq == anchor_seq and checkpoint.hash != expected_prev:
                return ChainReport(org_id, 0, head_seq, _rewritten(checkpoint, None), newest)
        at_seq = {checkpoint.seq: checkpoint for checkpoint in pinned if checkpoint.seq > anchor_seq}
        expected_seq = anchor_seq + 1
        checked = 0
        async for row in conn.cursor(_CHAIN_ROWS, org_id, anchor_seq, head_seq, prefetch=2000):
            problem = _check_link(row, expected_seq, expected_prev)
            checkpoint = at_seq.get(row["seq"])
            if problem is None and checkpoint is not None and bytes(row["hash"]) != checkpoint.hash:
                problem = _rewritten(checkpoint, row["id"])
            if problem is not None:
                return ChainReport(org_id, checked, head_seq, problem, newest)
            checked += 1
            expected_seq, expected_prev = row["seq"] + 1, bytes(row["hash"])
        if expected_seq <= head_seq:
            return ChainReport(org_id, checked, head_seq, ChainBreak(
                expected_seq, None, f"rows seq {expected_seq}..{head_seq} are missing at the end"), newest)
        if expected_prev != head_hash:
            return ChainReport(org_id, checked, head_seq, ChainBreak(
                head_seq, None, "the last row's hash differs from the recorded chain head"), newest)
        return ChainReport(org_id, checked, head_seq, _short_of(newest, head_seq), newest)


def _short_of(checkpoint: Checkpoint | None, head_seq: int) -> ChainBreak | None:
    if checkpoint is None or checkpoint.seq <= head_seq:
        return None
    return ChainBreak(head_seq + 1, None, (
        f"the chain ends at seq {head_seq} but the checkpoint signed at {checkpoint.at.isoformat()} reaches "
        f"seq {checkpoint.seq}: rows {head_seq + 1}..{checkpoint.seq} were removed and the head moved back"))


def _rewritten(checkpoint: Checkpoint, row_id: int | None) -> ChainBreak:
    return ChainBreak(checkpoint.seq, row_id, (
        f"the hash at seq {checkpoint.seq} differs from the checkpoint signed at "
        f"{checkpoint.at.isoformat()}: the chain up to here was rewritten"))


@dataclass(frozen=True)
class ChainHead:
    org_id: str | None  # None: the platform's chain
    seq: int
    hash: bytes


async def chain_heads(db: Database) -> list[ChainHead]:
    """Every chain's head (migrations/0007_audit_checkpoints.sql), for the checkpointer."""
    async with db.platform() as conn:
        rows = await conn.fetch("SELECT chain, seq, hash FROM audit_chain_heads_all()")
    return [ChainHead(row["chain"] or None, row["seq"], bytes(row["hash"])) for row in rows]


async def still_holds(db: Database, checkpoint: Checkpoint) -> bool:
    """Whether the chain still contains `checkpoint`: its row at that seq has the signed hash (or has been
    archived past the retention anchor, where the database can no longer show it)."""
    async with _context(db, checkpoint.org_id) as conn:
        found = await conn.fetchrow(
            "SELECT s.anchor_seq, s.anchor_hash, r.rows, r.same FROM audit_chain_state() s, "
            "LATERAL (SELECT count(*) AS rows, count(*) FILTER (WHERE hash = $3) AS same FROM audit_logs "
            "         WHERE org_id IS NOT DISTINCT FROM $1 AND seq = $2) r",
            checkpoint.org_id, checkpoint.seq, checkpoint.hash)
    if found["rows"]:
        return found["same"] == found["rows"]  # more than one row at a seq is a fork: not the signed one
    anchor_seq = found["anchor_seq"] or 0
    if checkpoint.seq == anchor_seq:
        return bytes(found["anchor_hash"]) == checkpoint.hash
    return checkpoint.seq < anchor_seq


def _check_link(row: asyncpg.Record, expected_seq: int, expected_prev: bytes) -> ChainBreak | None:
    seq, row_id = row["seq"], row["id"]
    if seq < expected_seq:
        return ChainBreak(seq, row_id, f"seq {seq} appears twice (a fork)")
    if seq > expected_seq:
        missing = f"{expected_seq}" if seq == expected_seq + 1 else f"{expected_seq}..{seq - 1}"
        return ChainBreak(expected_seq, None, f"row seq {missing} is missing before row id {row_id}")
    if bytes(row["prev_hash"]) != expected_prev:
        return ChainBreak(seq, row_id, "prev_hash does not match the previous row's hash")
    if hashlib.sha256(expected_prev + row["canonical"].encode()).digest() != bytes(row["hash"]):
        return ChainBreak(seq, row_id, "the row's content does not match its hash (edited)")
    return None


async def ensure_partitions(db: Database, months_ahead: int = 3) -> None:
    """Create the audit partitions up to `months_ahead` months from now (call at startup, and monthly)."""
    async with db.platform() as conn:
        await conn.execute("SELECT audit_ensure_partitions($1)", months_ahead)
