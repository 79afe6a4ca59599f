"""The audit log on the real PostgreSQL (security.md, "Audit log"): append-only and hash-chained per org."""

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest

from agentbox.api.audit import AuditEvent, Checkpoint, ensure_partitions, record, still_holds, verify_chain
from agentbox.api.db import Database

from .conftest import create_orgs

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLWhlcmU"


def event(org: str | None, action: str = "mcp.configuration.create", **fields) -> AuditEvent:
    base = {"actor_sub": "alice", "actor_role": "admin", "target": "mcp_configuration/github",
            "ip": "203.0.113.7", "user_agent": "pytest", "request_id": "req-1"}
    return AuditEvent(org_id=org, action=action, outcome=fields.pop("outcome", "success"), **(base | fields))


@pytest.fixture(scope="module", autouse=True)
async def orgs(app_db):
    await create_orgs(app_db, "audit-a", "audit-b", "fork", "edit", "gone", "tail")


async def test_a_row_records_who_what_where_and_outcome(app_db):
    written = await record(app_db, event("audit-a", outcome="denied", reason="not an admin",
                                         details={"name": "github"}))
    async with app_db.tenant("audit-a") as conn:
        row = await conn.fetchrow("SELECT * FROM audit_logs WHERE id = $1", written.id)
    who_what = [row[k] for k in ("actor_sub", "actor_role", "action", "target", "outcome", "reason")]
    assert who_what == ["alice", "admin", "mcp.configuration.create", "mcp_configuration/github", "denied",
                        "not an admin"]
    assert (str(row["ip"]), row["user_agent"], row["request_id"]) == ("203.0.113.7", "pytest", "req-1")
    assert row["org_id"] == "audit-a" and row["created_at"] is not None and row["seq"] == written.seq
    assert bytes(row["hash"]).hex() == written.hash


async def test_the_row_shares_the_callers_transaction(app_db):
    async with app_db.tenant("audit-b") as conn:
        before = await conn.fetchval("SELECT count(*) FROM audit_logs")
    with pytest.raises(RuntimeError, match="the change failed"):
        async with app_db.tenant("audit-b") as conn:
            await record(conn, event("audit-b"))
            raise RuntimeError("the change failed")
    async with app_db.tenant("audit-b") as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs") == before
        await record(conn, event("audit-b"))
    async with app_db.tenant("audit-b") as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs") == before + 1
    assert (await verify_chain(app_db, "audit-b")).ok


async def test_no_token_or_key_is_stored(app_db):
    written = await record(app_db, event(
        "audit-a", reason=f"upstream said Bearer {JWT}",
        details={"token": "ghp_" + "x" * 36, "headers": {"Authorization": f"Bearer {JWT}"},
                 "note": f"token {JWT} seen", "ciphertext": "v1:k1:" + "Q" * 40}))
    async with app_db.tenant("audit-a") as conn:
        stored = await conn.fetchval("SELECT row_to_json(a)::text FROM audit_logs a WHERE id = $1",
                                     written.id)
    for secret in (JWT, "x" * 36, "Q" * 40):
        assert secret not in stored
    assert "[REDACTED]" in stored


async def test_client_text_with_nul_still_leaves_its_row(app_db):
    # PostgreSQL's text and jsonb refuse U+0000; a request carrying one must not go unaudited.
    written = await record(app_db, event("audit-a", outcome="failed", target="session/a\x00b",
                                         reason="422: invalid request: body.\x00", user_agent="ua\x00",
                                         details={"key\x00": "value\x00"}))
    async with app_db.tenant("audit-a") as conn:
        row = await conn.fetchrow("SELECT target, reason, user_agent, details::text AS details "
                                  "FROM audit_logs WHERE id = $1", written.id)
    assert dict(row) == {"target": "session/a\ufffdb", "reason": "422: invalid request: body.\ufffd",
                         "user_agent": "ua\ufffd", "details": '{"key\ufffd": "value\ufffd"}'}
    assert (await verify_chain(app_db, "audit-a")).ok


async def test_a_tenant_cannot_write_or_read_another_orgs_audit(app_db):
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_db.tenant("audit-a") as conn:
            await record(conn, event("audit-b"))
    async with app_db.tenant("audit-b") as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE org_id <> 'audit-b'") == 0


async def test_update_delete_and_truncate_are_refused_for_the_app(app_db):
    await record(app_db, event("audit-a"))
    forged_insert = ("INSERT INTO audit_logs (org_id, action, outcome, seq, prev_hash, hash) "
                     "VALUES ('audit-a', 'x', 'success', 1, '\\x00', '\\x00')")
    for statement in ("UPDATE audit_logs SET reason = 'x'", "DELETE FROM audit_logs", "TRUNCATE audit_logs",
                      "UPDATE audit_logs SET seq = 1", forged_insert, "TRUNCATE audit_logs_default",
                      "SELECT audit_retire_partition('audit_logs_default')",
                      "SELECT * FROM audit_chain_heads"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
            async with app_db.tenant("audit-a") as conn:
                await conn.execute(statement)


async def test_triggers_refuse_changes_even_for_the_owner(postgres, app_db):
    await record(app_db, event("audit-a"))
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        partition = await conn.fetchval(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'audit_logs'::regclass ORDER BY 1 LIMIT 1")
        for statement in ("UPDATE audit_logs SET reason = 'x'", "DELETE FROM audit_logs",
                          "TRUNCATE audit_logs", f"TRUNCATE {partition}", "TRUNCATE audit_logs_default",
                          f"DELETE FROM {partition}"):  # noqa: S608 (a catalog name)
            async with conn.transaction():
                await conn.execute("SELECT set_config('app.current_org', 'audit-a', true)")
                with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                    await conn.execute(statement)
    finally:
        await conn.close()


async def test_fifty_concurrent_inserts_for_one_org_leave_no_fork(app_db):
    async def one(i: int) -> None:
        async with app_db.tenant("fork") as conn:
            await record(conn, event("fork", request_id=f"req-{i}"))
            await asyncio.sleep(0.001 * (i % 3))  # hold the transaction open a little: real contention

    await asyncio.gather(*(one(i) for i in range(50)))
    async with app_db.tenant("fork") as conn:
        rows = await conn.fetch("SELECT seq, prev_hash, hash FROM audit_logs ORDER BY seq")
    assert [r["seq"] for r in rows] == list(range(1, 51))
    assert len({bytes(r["prev_hash"]) for r in rows}) == 50, "two rows chained onto the same predecessor"
    report = await verify_chain(app_db, "fork")
    assert report.ok and report.rows_checked == 50 and report.head_seq == 50


async def test_editing_a_row_makes_the_verifier_name_it(postgres, app_db):
    written = [await record(app_db, event("edit", request_id=f"r{i}")) for i in range(5)]
    assert (await verify_chain(app_db, "edit")).ok
    await _tamper(postgres, "UPDATE audit_logs SET outcome = 'success', reason = 'nothing to see' "
                            "WHERE id = $1", written[2].id)
    report = await verify_chain(app_db, "edit")
    assert not report.ok
    assert (report.first_broken.id, report.first_broken.seq) == (written[2].id, 3)
    assert "edited" in report.first_broken.reason


async def test_deleting_a_row_makes_the_verifier_name_it(postgres, app_db):
    written = [await record(app_db, event("gone", request_id=f"r{i}")) for i in range(5)]
    await _tamper(postgres, "DELETE FROM audit_logs WHERE id = $1", written[1].id)
    report = await verify_chain(app_db, "gone")
    assert report.first_broken.seq == 2 and "missing" in report.first_broken.reason


async def test_deleting_the_newest_rows_is_caught_by_the_head(postgres, app_db):
    written = [await record(app_db, event("tail", request_id=f"r{i}")) for i in range(4)]
    await _tamper(postgres, "DELETE FROM audit_logs WHERE id = $1", written[3].id)
    report = await verify_chain(app_db, "tail")
    assert report.first_broken.seq == 4 and "missing" in report.first_broken.reason


async def test_the_platform_has_its_own_chain(app_db):
    await record(app_db, event(None, action="prompt.global.create", actor_role="service_role"))
    report = await verify_chain(app_db, None)
    assert report.ok and report.rows_checked >= 1
    async with app_db.tenant("audit-a") as conn:
        assert await conn.fetchval("SELECT count(*) FROM audit_logs WHERE org_id IS NULL") == 0


async def test_partitions_are_kept_ahead(postgres, app_db):
    await ensure_partitions(app_db, months_ahead=5)
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        names = {r["relname"] for r in await conn.fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'audit_logs'::regclass")}
        months = await conn.fetch(
            "SELECT 'audit_logs_' || to_char(date_trunc('month', now() AT TIME ZONE 'UTC') "
            "+ make_interval(months => m), 'YYYY_MM') AS name FROM generate_series(0, 5) m")
        assert {m["name"] for m in months} | {"audit_logs_default"} <= names
    finally:
        await conn.close()


async def test_retiring_a_past_month_keeps_the_chain_verifiable_from_its_anchor(postgres, app_db):
    await create_orgs(app_db, "retire")
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        # Two months back, written by the owner (only it may set created_at); chained like any row.
        past = await conn.fetchval(
            "SELECT date_trunc('month', now() AT TIME ZONE 'UTC') - interval '2 months'")
        name = f"audit_logs_{past:%Y_%m}"
        start = f"'{past:%Y-%m-%d}Z'::timestamptz"
        await conn.execute(f"CREATE TABLE {name} PARTITION OF audit_logs "
                           f"FOR VALUES FROM ({start}) TO ({start} + interval '1 month')")
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.current_org', 'retire', true)")
            for _ in range(3):
                await conn.execute("INSERT INTO audit_logs (org_id, action, outcome, created_at) "
                                   "VALUES ('retire', 'old.thing', 'success', $1)",
                                   past.replace(day=2, tzinfo=UTC))
        await record(app_db, event("retire"))
        assert (await verify_chain(app_db, "retire")).rows_checked == 4

        current = await conn.fetchval("SELECT 'audit_logs_' || to_char(now() AT TIME ZONE 'UTC', 'YYYY_MM')")
        for unfinished in (current, "audit_logs_default"):
            with pytest.raises(asyncpg.RaiseError, match="has not ended yet"):
                await conn.execute("SELECT audit_retire_partition($1)", unfinished)
        await conn.execute("SELECT audit_retire_partition($1)", name)
    finally:
        await conn.close()
    after = await record(app_db, event("retire"))
    report = await verify_chain(app_db, "retire")
    assert report.ok and report.rows_checked == 2 and report.head_seq == after.seq == 5
    # A signed checkpoint at the anchor is held to the anchor; one before it went with the archive.
    async with app_db.tenant("retire") as conn:
        anchor_hash = bytes((await conn.fetchrow("SELECT * FROM audit_chain_state()"))["anchor_hash"])
    now = datetime.now(UTC)
    for checkpoint, holds in ((Checkpoint("retire", 3, anchor_hash, now), True),
                              (Checkpoint("retire", 3, bytes(32), now), False),
                              (Checkpoint("retire", 2, bytes(32), now), True)):
        assert (await verify_chain(app_db, "retire", [checkpoint])).ok is holds
        assert await still_holds(app_db, checkpoint) is holds


async def _tamper(postgres, statement: str, *args) -> None:
    """What an attacker with the superuser would do: triggers and row security off, then the edit."""
    conn = await asyncpg.connect(postgres.superuser_dsn)
    try:
        await conn.execute("SET session_replication_role = replica")
        assert (await conn.execute(statement, *args)).endswith(" 1")
    finally:
        await conn.close()


async def test_an_append_in_its_own_transaction_leaves_no_context_on_the_pooled_connection(postgres):
    async with Database(postgres.app_dsn, max_size=1) as db:
        await record(db, event("audit-a"))
        await record(db, event(None, action="platform.thing"))
        async with db.connection() as conn:
            settings = await conn.fetchrow("SELECT current_setting('app.current_org', true) AS org, "
                                           "current_setting('app.platform', true) AS platform")
            assert (settings["org"] or "", settings["platform"] or "") == ("", "")
            assert await conn.fetchval("SELECT count(*) FROM audit_logs") == 0
