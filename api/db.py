"""The API's database: an asyncpg pool and the per-transaction tenant context row security relies on.

    db = Database(dsn)                            # connects lazily: the API starts even if PostgreSQL is down
    async with db.tenant("acme") as conn:         # one transaction, app.current_org = 'acme'
        rows = await conn.fetch("SELECT * FROM mcp_configurations")
    async with db.platform() as conn:             # the service role: orgs, global prompts, platform audit
        ...
    await db.close()

The context is set with set_config(..., true), so it lives exactly as long as the transaction: a pooled
connection handed to the next caller carries nothing over. Any failure to reach PostgreSQL (refused,
timed out, dropped mid-query, too many connections) surfaces as `DatabaseUnavailable`, quickly, and the
next call tries again: the web layer answers 503 and recovers without a restart.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg

# Org ids are DNS labels (they name `tenant-<org>` namespaces); checked here so a bad one never reaches SQL.
ORG_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ORG_ID_MAX_LENGTH = 56

# Failures that mean "PostgreSQL cannot be used right now", as opposed to a bad query.
_UNAVAILABLE = (
    OSError,  # refused, unreachable, reset
    TimeoutError,  # connect, acquire or command timeout
    asyncpg.PostgresConnectionError,  # the connection broke or was rejected
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.InvalidAuthorizationSpecificationError,  # wrong role or password: unusable until fixed
    asyncpg.InvalidCatalogNameError,  # the database does not exist (yet)
)


class DatabaseUnavailable(Exception):
    """PostgreSQL cannot be reached or did not answer in time. Retrying later may succeed."""


class InvalidOrgId(ValueError):
    """An org id that is not a DNS label; the message names it."""


def check_org_id(org_id: str) -> str:
    if not isinstance(org_id, str) or len(org_id) > ORG_ID_MAX_LENGTH or not ORG_ID.match(org_id):
        raise InvalidOrgId(f"org id {org_id!r} must be a DNS label of at most {ORG_ID_MAX_LENGTH} characters")
    return org_id


class Database:
    """An asyncpg pool with tenant and platform transactions. Safe to share across the whole app."""

    def __init__(self, dsn: str, *, min_size: int = 0, max_size: int = 10, connect_timeout: float = 2.0,
                 command_timeout: float = 10.0, acquire_timeout: float = 3.0,
                 application_name: str = "agentbox-api") -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._connect_timeout = connect_timeout
        self._command_timeout = command_timeout
        self._acquire_timeout = acquire_timeout
        self._application_name = application_name
        self._pool: asyncpg.Pool | None = None
        self._pool_lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                # With min_size 0 the pool opens no connection yet, so this works while the server is down.
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=self._min_size, max_size=self._max_size,
                    timeout=self._connect_timeout, command_timeout=self._command_timeout,
                    server_settings={"application_name": self._application_name},
                )
        return self._pool

    async def open(self) -> Database:
        """Create the pool now (optional: the first transaction does it). Never fails for a down server
        when min_size is 0."""
        async with self._guard():
            await self._get_pool()
        return self

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def __aenter__(self) -> Database:
        return await self.open()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @asynccontextmanager
    async def tenant(self, org_id: str) -> AsyncIterator[asyncpg.Connection]:
        """A transaction in which row security shows and accepts only `org_id`'s rows."""
        async with self._transaction({"app.current_org": check_org_id(org_id)}) as conn:
            yield conn

    @asynccontextmanager
    async def platform(self, org_id: str | None = None) -> AsyncIterator[asyncpg.Connection]:
        """A transaction in the platform (service role) context: organizations, global prompts and the
        platform's audit chain; with `org_id` also that org's rows (the platform acting on one org)."""
        settings = {"app.platform": "on"}
        if org_id is not None:
            settings["app.current_org"] = check_org_id(org_id)
        async with self._transaction(settings) as conn:
            yield conn

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection outside any transaction and context: each statement commits on its own and
        row security shows it nothing unless the statement sets a context itself (audit.record does)."""
        async with self._guard():
            pool = await self._get_pool()
            async with pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn

    @asynccontextmanager
    async def _transaction(self, context: dict[str, str]) -> AsyncIterator[asyncpg.Connection]:
        # Not `conn.transaction()` as a context manager: after the server dropped the connection, its
        # exit raises a bare InterfaceError that would hide the real cause.
        async with self.connection() as conn:
            transaction = conn.transaction()
            await transaction.start()
            try:
                await conn.execute(
                    "SELECT " + ", ".join(f"set_config(${2 * i + 1}, ${2 * i + 2}, true)"
                                          for i in range(len(context))),
                    *[part for item in context.items() for part in item],
                )
                yield conn
            except BaseException:
                if not _gone(conn):
                    await transaction.rollback()
                raise
            if _gone(conn):
                raise DatabaseUnavailable("database unavailable: the connection closed before the commit")
            await transaction.commit()

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        """Turns the database's own failures into DatabaseUnavailable. A timeout or socket error from the
        caller's work inside the block (say, a Kubernetes call made inside a transaction) stays theirs."""
        try:
            yield
        except _UNAVAILABLE as error:
            if isinstance(error, OSError | TimeoutError) and not _raised_through_asyncpg(error):
                raise
            raise DatabaseUnavailable(_describe(error)) from error

    async def ping(self) -> None:
        """Round-trip to the server (readiness); raises DatabaseUnavailable when it cannot."""
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")


def _gone(conn: asyncpg.Connection) -> bool:
    # When the server drops a pooled connection, the pool detaches its proxy: any call then raises.
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def _raised_through_asyncpg(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        if traceback.tb_frame.f_globals.get("__name__", "").startswith("asyncpg."):
            return True
        traceback = traceback.tb_next
    return False


def _describe(error: BaseException) -> str:
    # Never echo the DSN (it carries the password): the error type and asyncpg's message suffice.
    detail = str(error).strip() or type(error).__name__
    return f"database unavailable: {type(error).__name__}: {detail}"[:300]
