"""Schema migrations: the ordered SQL files in migrations/, applied once each, in order.

    python -m agentbox.api.migrate --dsn postgresql://owner@host/db [--dir migrations]
    python -m agentbox.api.migrate provision --dsn <superuser DSN> --database agentbox
        (passwords from AGENTBOX_DB_OWNER_PASSWORD and AGENTBOX_DB_APP_PASSWORD)

A small runner of our own: the maintained tools either drive a synchronous driver (yoyo, alembic via
SQLAlchemy) or are not Python (dbmate, sqitch), and this one needs only asyncpg, plain SQL files, a
checksum table and an advisory lock.

Each file runs in its own transaction together with its row in `schema_migrations`, so a failing file
leaves nothing behind. A file whose content changed after it was applied is an error naming it.
Sessions that migrate at the same time serialise on an advisory lock; the second finds nothing to do.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

log = logging.getLogger(__name__)

DEFAULT_MIGRATIONS_DIR = Path(os.environ.get("AGENTBOX_MIGRATIONS_DIR", Path(__file__).resolve().parents[1]
                                             / "migrations"))
APP_ROLE = "agentbox_app"  # the migrations grant to this role by name
OWNER_ROLE = "agentbox_owner"
# 'MIGR': the advisory-lock key every migrating session takes.
MIGRATION_LOCK_KEY = 0x4D494752
FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")


class MigrationError(Exception):
    """A migration cannot be applied; the message names the file."""


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file in `directory`, ordered by version; names that do not fit are an error."""
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        match = FILE_NAME.match(path.name)
        if not match:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lowercase_words.sql")
        migrations.append(Migration(match["version"], match["name"], path, path.read_text(encoding="utf-8")))
    versions = [m.version for m in migrations]
    duplicates = sorted({v for v in versions if versions.count(v) > 1})
    if duplicates:
        raise MigrationError(f"two migration files share version {duplicates[0]} in {directory}")
    return migrations


async def migrate(dsn: str, directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[str]:
    """Apply the pending migrations as the role in `dsn` (the schema owner); return the files applied."""
    migrations = load_migrations(directory)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            return await _apply_pending(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    finally:
        await conn.close()


async def _apply_pending(conn: asyncpg.Connection, migrations: list[Migration]) -> list[str]:
    await conn.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
             version     text PRIMARY KEY,
             name        text NOT NULL,
             checksum    text NOT NULL,
             applied_at  timestamptz NOT NULL DEFAULT now())"""
    )
    applied = {row["version"]: row for row in await conn.fetch("SELECT version, name, checksum FROM "
                                                                  "schema_migrations")}
    for migration in migrations:
        row = applied.get(migration.version)
        if row is not None and row["checksum"] != migration.checksum:
            raise MigrationError(
                f"{migration.path.name} changed after it was applied (checksum {row['checksum'][:12]} in the "
                f"database, {migration.checksum[:12]} on disk): add a new migration instead of editing it"
            )
    done = []
    for migration in migrations:
        if migration.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version, migration.name, migration.checksum,
                )
        except asyncpg.PostgresError as error:
            raise MigrationError(f"{migration.path.name} failed: {error}") from error
        log.info("applied migration %s", migration.path.name)
        done.append(migration.path.name)
    return done


@dataclass(frozen=True)
class ProvisionedDatabase:
    owner_dsn: str
    app_dsn: str


async def provision(superuser_dsn: str, database: str, owner_password: str,
                    app_password: str) -> ProvisionedDatabase:
    """Create (idempotently) the owner and app roles and a database the owner owns.

    The app role can log in but owns nothing, is not superuser and cannot bypass row security.
    Returns DSNs on the same host and port as `superuser_dsn`.
    """
    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", database):
        raise MigrationError(f"database name {database!r} must be a lowercase identifier")
    conn = await asyncpg.connect(superuser_dsn, timeout=10)
    try:
        for role, password in ((OWNER_ROLE, owner_password), (APP_ROLE, app_password)):
            exists = await conn.fetchval("SELECT 1 FROM pg_roles WHERE rolname = $1", role)
            verb = "ALTER" if exists else "CREATE"
            # Role options cannot be bound parameters; the literal is quoted by PostgreSQL itself.
            quoted = await conn.fetchval("SELECT quote_literal($1)", password)
            await conn.execute(
                f"{verb} ROLE {role} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS PASSWORD {quoted}"
            )
        if not await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", database):
            await conn.execute(f'CREATE DATABASE "{database}" OWNER {OWNER_ROLE}')
        await conn.execute(f'REVOKE ALL ON DATABASE "{database}" FROM PUBLIC')
        await conn.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {APP_ROLE}')
    finally:
        await conn.close()
    return ProvisionedDatabase(
        owner_dsn=_with_credentials(superuser_dsn, OWNER_ROLE, owner_password, database),
        app_dsn=_with_credentials(superuser_dsn, APP_ROLE, app_password, database),
    )


def _with_credentials(dsn: str, user: str, password: str, database: str) -> str:
    parts = urlsplit(dsn)
    host = parts.hostname or "127.0.0.1"
    netloc = f"{quote(user)}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, f"/{database}", parts.query, ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agentbox.api.migrate",
                                     description="Apply agentbox's SQL migrations, or provision roles.")
    parser.add_argument("command", nargs="?", choices=["migrate", "provision"], default="migrate")
    parser.add_argument("--dsn", default=os.environ.get("AGENTBOX_DATABASE_OWNER_URL"),
                        help="owner DSN for migrate, superuser DSN for provision")
    parser.add_argument("--dir", type=Path, default=DEFAULT_MIGRATIONS_DIR, help="folder of NNNN_*.sql files")
    parser.add_argument("--database", default="agentbox", help="provision: the database to create")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.dsn:
        parser.error("--dsn (or AGENTBOX_DATABASE_OWNER_URL) is required")
    try:
        if args.command == "provision":
            passwords = [os.environ.get(f"AGENTBOX_DB_{who}_PASSWORD") for who in ("OWNER", "APP")]
            if not all(passwords):
                parser.error("provision needs AGENTBOX_DB_OWNER_PASSWORD and AGENTBOX_DB_APP_PASSWORD")
            result = asyncio.run(provision(args.dsn, args.database, *passwords))
            print(f"owner: {result.owner_dsn.split('@')[1]} as {OWNER_ROLE}; app: as {APP_ROLE}")
        else:
            applied = asyncio.run(migrate(args.dsn, args.dir))
            print(f"applied {len(applied)} migration(s)" + (f": {', '.join(applied)}" if applied else ""))
    except (MigrationError, OSError, asyncpg.PostgresError) as error:
        print(f"migrate: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
