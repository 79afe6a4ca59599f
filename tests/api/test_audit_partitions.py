"""The running API keeps the audit table's coming monthly partitions (real PostgreSQL): at start-up, and
again on its interval after one went missing."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg

from agentbox.api.app import Services, create_app
from agentbox.api.db import Database
from agentbox.api.settings import Settings


def month_partition(months_ahead: int) -> str:
    now = datetime.now(UTC)
    year, month = divmod(now.month - 1 + months_ahead, 12)
    return f"audit_logs_{now.year + year}_{month + 1:02d}"


async def partitions(superuser: asyncpg.Connection) -> set[str]:
    rows = await superuser.fetch("SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                                 "WHERE i.inhparent = 'audit_logs'::regclass")
    return {row["relname"] for row in rows}


async def test_startup_and_the_interval_create_the_coming_partitions(postgres):
    superuser = await asyncpg.connect(postgres.superuser_dsn)
    database = Database(postgres.app_dsn)
    furthest = month_partition(3)
    try:
        await superuser.execute(f"DROP TABLE IF EXISTS {furthest}")
        assert furthest not in await partitions(superuser)
        app = create_app(services_override=Services(
            settings=Settings(audit_partition_interval_seconds=0.2), database=database))
        async with app.router.lifespan_context(app):
            for _ in range(50):
                if furthest in await partitions(superuser):
                    break
                await asyncio.sleep(0.1)
            assert {month_partition(n) for n in range(4)} <= await partitions(superuser)
            await superuser.execute(f"DROP TABLE {furthest}")
            await asyncio.sleep(0.6)  # the next pass
            assert furthest in await partitions(superuser)
    finally:
        await database.close()
        await superuser.close()
