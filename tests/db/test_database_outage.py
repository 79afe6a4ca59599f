"""PostgreSQL down or frozen: a typed DatabaseUnavailable, quickly, and recovery without a restart."""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from agentbox.api.db import Database, DatabaseUnavailable

FAST = 3.0  # seconds: "quickly" for a refused or frozen server with the settings below


def quick(dsn: str) -> Database:
    return Database(dsn, max_size=2, connect_timeout=1.0, acquire_timeout=1.5, command_timeout=2.0)


async def test_a_stopped_server_gives_database_unavailable_then_recovers(postgres):
    async with quick(postgres.app_dsn) as db:
        async with db.tenant("any-org") as conn:  # a live pooled connection before the outage
            assert await conn.fetchval("SELECT 1") == 1
        with postgres.server.stopped():
            for attempt in (db.ping, lambda: _one_transaction(db)):
                started = time.monotonic()
                with pytest.raises(DatabaseUnavailable, match="database unavailable"):
                    await attempt()
                assert time.monotonic() - started < FAST
        # Back up: the same Database object serves again, the dropped pooled connection replaced.
        assert await _one_transaction(db) == 1
        await db.ping()


async def test_the_server_going_away_mid_transaction_gives_database_unavailable(postgres):
    async with quick(postgres.app_dsn) as db:
        with pytest.raises(DatabaseUnavailable):
            async with db.tenant("any-org") as conn:
                await conn.fetchval("SELECT 1")
                with postgres.server.stopped():
                    await conn.fetchval("SELECT 2")
        assert await _one_transaction(db) == 1


@pytest.mark.parametrize("close_lag", [0.0, 1.0], ids=["closed", "fatal-before-close"])
async def test_a_session_the_server_ends_between_statements_is_unavailable_and_never_reused(postgres,
                                                                                            close_lag):
    """What a restart does to a pooled connection idle inside a transaction: the server's FATAL arrives
    between two statements, then its socket closes. Whether the next statement comes after the close
    ("connection is closed") or between the two (asyncpg's "another operation is in progress", the error
    of issue #12), it is DatabaseUnavailable; and with a pool of one the next transaction still gets a
    working connection: the broken one was dropped, not handed out again."""
    async with _close_lagging_proxy(postgres.server.port, close_lag) as port, \
            Database(postgres.app_dsn.replace(f":{postgres.server.port}/", f":{port}/"), max_size=1,
                     connect_timeout=1.0, acquire_timeout=1.5, command_timeout=2.0) as db:
        with pytest.raises(DatabaseUnavailable, match="another operation" if close_lag else None):
            async with db.tenant("any-org") as conn:
                backend = await conn.fetchval("SELECT pg_backend_pid()")
                await _end_session(postgres, backend)
                await asyncio.sleep(0.1)  # the FATAL has arrived (and the close, unless held back)
                await conn.fetchval("SELECT 2")
        async with db.tenant("any-org") as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") != backend


@contextlib.asynccontextmanager
async def _close_lagging_proxy(server_port: int, lag: float) -> AsyncIterator[int]:
    """A loopback TCP proxy to PostgreSQL that passes bytes on at once but the server closing a connection
    only `lag` seconds later. Yields its port."""
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lag: float) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            await asyncio.sleep(lag)
        finally:
            writer.close()

    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", server_port)
        await asyncio.gather(pipe(client_reader, server_writer, 0), pipe(server_reader, client_writer, lag),
                             return_exceptions=True)

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield proxy.sockets[0].getsockname()[1]
    finally:
        proxy.close()


async def _end_session(postgres, backend: int) -> None:
    conn = await asyncpg.connect(postgres.superuser_dsn)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1, 5000)", backend)
    finally:
        await conn.close()


async def test_the_api_can_start_while_the_database_is_down(postgres):
    with postgres.server.stopped():
        db = await quick(postgres.app_dsn).open()
        with pytest.raises(DatabaseUnavailable):
            await db.ping()
    try:
        assert await _one_transaction(db) == 1
    finally:
        await db.close()


async def test_a_frozen_server_times_out_instead_of_hanging(postgres):
    postmaster = int((postgres.server.directory / "data" / "postmaster.pid").read_text().split()[0])
    db = quick(postgres.app_dsn)
    os.kill(postmaster, signal.SIGSTOP)  # accepts TCP in the kernel, never answers the startup
    try:
        started = time.monotonic()
        with pytest.raises(DatabaseUnavailable, match="TimeoutError"):
            await _one_transaction(db)
        assert time.monotonic() - started < FAST
    finally:
        os.kill(postmaster, signal.SIGCONT)
        await db.close()


async def test_a_slow_query_is_cut_by_the_command_timeout(postgres):
    async with quick(postgres.app_dsn) as db:
        with pytest.raises(DatabaseUnavailable, match="TimeoutError"):
            async with db.tenant("any-org") as conn:
                await conn.execute("SELECT pg_sleep(10)")
        assert await _one_transaction(db) == 1


async def test_the_callers_own_timeouts_are_not_blamed_on_the_database(postgres):
    async with quick(postgres.app_dsn) as db:
        with pytest.raises(TimeoutError, match="a Kubernetes call timed out"):
            async with db.tenant("any-org"):
                raise TimeoutError("a Kubernetes call timed out")
        with pytest.raises(ConnectionRefusedError):
            async with db.tenant("any-org"):
                raise ConnectionRefusedError("the runner is down")


async def test_the_password_never_appears_in_the_error(postgres):
    db = Database(postgres.app_dsn.replace(f":{postgres.server.port}/", ":1/"), connect_timeout=1.0)
    with pytest.raises(DatabaseUnavailable) as caught:
        await db.ping()
    assert postgres.server.app_password not in str(caught.value)
    await db.close()


async def _one_transaction(db: Database) -> int:
    async with db.tenant("any-org") as conn:
        return await conn.fetchval("SELECT 1")


async def test_wrong_credentials_or_database_are_unavailable_not_a_crash(postgres):
    for dsn in (postgres.app_dsn.replace(postgres.server.app_password, "wrong-password"),
                postgres.app_dsn.rsplit("/", 1)[0] + "/no_such_database"):
        db = quick(dsn)
        with pytest.raises(DatabaseUnavailable, match=r"InvalidPasswordError|InvalidCatalogNameError"):
            await _one_transaction(db)
        await db.close()
