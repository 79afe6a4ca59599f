"""Helpers for the database tests: a Database on the app role and a way to seed orgs."""

from collections.abc import AsyncIterator

import pytest_asyncio

from agentbox.api.db import Database


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def app_db(postgres) -> AsyncIterator[Database]:
    """The API's view of the module's database: the app role, row security in force."""
    async with Database(postgres.app_dsn, max_size=5) as db:
        yield db


async def create_orgs(db: Database, *org_ids: str) -> None:
    async with db.platform() as conn:
        await conn.executemany(
            "INSERT INTO organizations (id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING",
            [(org,) for org in org_ids])
