"""The API's database: an asyncpg pool and the per-transaction tenant context row security relies on.

    db = Database(dsn)                            # connects lazily: the API starts even if PostgreSQL is down
    async with db.tenant("acme") as conn:         # one transaction, app.current_org = 'acme'
        rows = await conn.fetch("SELECT * FROM mcp_configurations")
    async with db.platform() as conn:             # the service role: orgs, global prompts, platform audit
        ...
    await db.close()

The context is set with set_config(..., true), so it lives exactly as long as the transaction: a pooled
connection handed to the next caller carries nothing over. Any failure to reach PostgreSQL (refused,
timed out, dropped mid-query, too many connections, restarting) surfaces as `DatabaseUnavailable`,
quickly, and the next call tries again: the web layer answers 503 (one handler, agentbox.api.problems)
and recovers without a restart. A connection that failed that way is terminated before it goes back to
the pool, so the pool never hands a broken one to the next caller: it opens a fresh one instead.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from asyncpg.transaction import Transaction

# Org ids are DNS labels (they name `tenant-<org>` namespaces); checked here so a bad one never reaches SQL.
ORG_ID = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ORG_ID_MAX_LENGTH = 56

# Failures that mean "PostgreSQL cannot be used right now", as opposed to a bad query.
_UNAVAILABLE = (
    asyncpg.PostgresConnectionError,  # the connection broke or was rejected (ConnectionDoesNotExistError...)
    asyncpg.CannotConnectNowError,  # starting up or shutting down
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,  # a fast or smart shutdown ended the session
    asyncpg.CrashShutdownError,
    asyncpg.InvalidAuthorizationSpecificationError,  # wrong role or password: unusable until fixed
    asyncpg.InvalidCatalogNameError,  # the database does not exist (yet)
    # asyncpg's protocol lost its place in the stream: the server ended the session between two of our
    # statements (its FATAL arrived while the connection sat idle), so the next statement finds "another
    # operation (2) is in progress". Nothing a query does causes it.
    asyncpg.InternalClientError,
)
# Also unavailable when raised by asyncpg itself rather than by the caller's own work in the block.
_TRANSPORT = (
    OSError,  # refused, unreachable, reset
    TimeoutError,  # connect, acquire or command timeout
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
                try:
                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=self._min_size, max_size=self._max_size,
                        timeout=self._connect_timeout, command_timeout=self._command_timeout,
                        server_settings={"application_name": self._application_name},
                    )
                except Exception as error:
                    _raise_if_unavailable(error, None)
                    raise
        return self._pool

    async def open(self) -> Database:
        """Create the pool now (optional: the first transaction does it). Never fails for a down server
        when min_size is 0."""
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
        row security shows it nothing unless the statement sets a context itself (audit.record does).
        Every way in to PostgreSQL passes here, so this is where its failures are told apart from the
        caller's and broken connections are kept out of the pool."""
        pool = await self._get_pool()
        try:
            conn = await pool.acquire(timeout=self._acquire_timeout)
        except Exception as error:
            _raise_if_unavailable(error, None)
            raise
        try:
            yield conn
        except Exception as error:
            # A connection that failed this way is in an unknown state (mid-statement, mid-cancel, its
            # session ended): the next caller gets a fresh one, not this one after a reset that may hang.
            _raise_if_unavailable(error, conn, terminate=True)
            raise
        finally:
            await _release(pool, conn)

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
                await _roll_back(conn, transaction)
                raise
            if _gone(conn):
                raise DatabaseUnavailable("database unavailable: the connection closed before the commit")
            await transaction.commit()

    async def ping(self) -> None:
        """Round-trip to the server (readiness); raises DatabaseUnavailable when it cannot."""
        async with self.connection() as conn:
            await conn.fetchval("SELECT 1")


def _raise_if_unavailable(error: Exception, conn: asyncpg.Connection | None, *,
                          terminate: bool = False) -> None:
    """Raise DatabaseUnavailable (terminating `conn` first when asked) if `error` is the database's failure;
    return if it is not: a bad query, or the caller's own error raised inside the block (a Kubernetes
    timeout in a transaction stays theirs)."""
    if isinstance(error, DatabaseUnavailable):
        unavailable = error
    elif isinstance(error, _UNAVAILABLE) or (isinstance(error, _TRANSPORT)
                                             and _raised_through_asyncpg(error)):
        unavailable = DatabaseUnavailable(_describe(error))
    # "connection is closed", "another operation is in progress" once the server ended the session: the
    # connection is gone. The same error on a live connection is a misuse of it, a bug: not an outage.
    elif isinstance(error, asyncpg.InterfaceError) and conn is not None and _gone(conn):
        unavailable = DatabaseUnavailable(_describe(error))
    else:
        return
    if terminate and conn is not None:
        _drop(conn)
    if unavailable is error:
        raise error
    raise unavailable from error


async def _roll_back(conn: asyncpg.Connection, transaction: Transaction) -> None:
    """Roll back after a failure without hiding it: when the rollback itself fails the connection is
    unusable, so it is dropped, and the caller sees the first error, not this one."""
    if _gone(conn):
        return
    try:
        await transaction.rollback()
    except Exception:
        _drop(conn)


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    # Release resets the connection; if that fails the pool terminates it and re-raises. The caller's
    # work is done (committed or already failing with its own error), so that failure is not theirs.
    try:
        await pool.release(conn)
    except Exception:
        logging.getLogger("agentbox.api.db").debug("a connection failed its reset and was dropped",
                                                   exc_info=True)


def _drop(conn: asyncpg.Connection) -> None:
    """Close the connection at once; the pool opens a fresh one for the next caller."""
    if not _gone(conn):
        conn.terminate()


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
