"""Chained audit inserts per second, through agentbox.api.audit against a throwaway PostgreSQL 15.

Each insert is the API's path: its own tenant transaction (set_config, INSERT with the chaining trigger,
COMMIT) on the app role. Measured for one org (every writer contends for the same chain) and for
several orgs (chains advance in parallel), then the verifier's speed over the result. The server runs
with fsync off (hack/postgres.sh), so the figures leave out disk flushes.

    python -m bench.bench_audit [--rows 5000] [--writers 8]     # one JSON document on stdout
"""

import argparse
import asyncio
import json
import secrets
import sys
import time

from agentbox.api.audit import AuditEvent, record, verify_chain
from agentbox.api.db import Database
from agentbox.api.migrate import migrate, provision
from bench.postgres import throwaway_postgres

TARGET_ROWS_PER_SECOND = 2000


async def insert_rows(db: Database, orgs: list[str], rows: int, writers: int) -> float:
    """Insert `rows` rows spread over `orgs` with `writers` concurrent writers; return rows per second."""
    counter = iter(range(rows))

    async def writer() -> None:
        for i in counter:
            org = orgs[i % len(orgs)]
            await record(db, AuditEvent(
                org_id=org, action="session.create", outcome="success", actor_sub=f"user-{i % 50}",
                actor_role="user", target=f"agentsession/s-{i}", ip="203.0.113.9", user_agent="bench",
                request_id=f"req-{i}", details={"runtime": "scripted", "n": i}))

    started = time.perf_counter()
    await asyncio.gather(*(writer() for _ in range(writers)))
    return rows / (time.perf_counter() - started)


async def run(rows: int, writers: int, dsn: str, server: dict) -> dict:
    database = f"bench_audit_{secrets.token_hex(3)}"
    created = await provision(dsn, database, secrets.token_urlsafe(16), secrets.token_urlsafe(16))
    await migrate(created.owner_dsn)
    many_orgs = [f"org-{i}" for i in range(8)]
    async with Database(created.app_dsn, max_size=writers) as db:
        async with db.platform() as conn:
            await conn.executemany("INSERT INTO organizations (id, name) VALUES ($1, $1)",
                                   [(org,) for org in ["warmup", "solo", *many_orgs]])
        await insert_rows(db, ["warmup"], min(200, rows), writers)  # open the pool's connections first
        one_org = await insert_rows(db, ["solo"], rows, writers)
        spread = await insert_rows(db, many_orgs, rows, writers)
        started = time.perf_counter()
        report = await verify_chain(db, "solo")
        verify_seconds = time.perf_counter() - started
    assert report.ok, report.first_broken
    return {
        "benchmark": "audit",
        "what": "chained audit rows inserted per second, one transaction per row, app role, RLS on",
        "server": server,
        "rows_per_run": rows,
        "concurrent_writers": writers,
        "one_org_rows_per_second": round(one_org),
        "eight_orgs_rows_per_second": round(spread),
        "verify_rows_per_second": round(report.rows_checked / verify_seconds),
        "verified_rows": report.rows_checked,
        "target_rows_per_second": TARGET_ROWS_PER_SECOND,
        "meets_target": one_org >= TARGET_ROWS_PER_SECOND,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--writers", type=int, default=8)
    args = parser.parse_args()
    with throwaway_postgres() as dsn:
        server = {"postgres": "15", "fsync": "off", "synchronous_commit": "off", "host": "127.0.0.1"}
        result = asyncio.run(run(args.rows, args.writers, dsn, server))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
