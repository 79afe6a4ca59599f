"""The migration runner and a SQL round trip through every table (issue 2's smoke test)."""

import asyncio
import secrets
import shutil
import subprocess
import sys
from datetime import timedelta

import asyncpg
import pytest

from agentbox.api.crypto import CipherContext, KeyRing, generate_key_entry
from agentbox.api.migrate import DEFAULT_MIGRATIONS_DIR, MigrationError, load_migrations, migrate, provision

from .conftest import create_orgs


@pytest.fixture
async def fresh(postgres_server):
    """An empty database (no migrations), dropped afterwards."""
    name = f"t_fresh_{secrets.token_hex(3)}"
    created = await provision(postgres_server.superuser_dsn, name, postgres_server.owner_password,
                              postgres_server.app_password)
    yield created
    conn = await asyncpg.connect(postgres_server.superuser_dsn)
    try:
        await conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await conn.close()


def test_files_are_ordered_and_named():
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    assert migrations[0].path.name == "0001_tenancy.sql"


async def test_concurrent_runs_apply_each_file_once_and_a_rerun_is_a_no_op(fresh):
    first, second = await asyncio.gather(migrate(fresh.owner_dsn), migrate(fresh.owner_dsn))
    expected = [m.path.name for m in load_migrations()]
    assert sorted([first, second], key=len) == [[], expected]
    assert await migrate(fresh.owner_dsn) == []


async def test_a_changed_applied_file_is_an_error_naming_it(fresh, tmp_path):
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, tmp_path, dirs_exist_ok=True)
    await migrate(fresh.owner_dsn, tmp_path)
    edited = tmp_path / "0002_mcp.sql"
    edited.write_text(edited.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match=r"0002_mcp\.sql changed after it was applied"):
        await migrate(fresh.owner_dsn, tmp_path)


async def test_a_failing_file_leaves_nothing_behind(fresh, tmp_path):
    (tmp_path / "0001_good.sql").write_text("CREATE TABLE kept (id int);")
    (tmp_path / "0002_bad.sql").write_text("CREATE TABLE half_done (id int);\nSELECT no_such_function();")
    with pytest.raises(MigrationError, match=r"0002_bad\.sql failed: .*no_such_function"):
        await migrate(fresh.owner_dsn, tmp_path)
    conn = await asyncpg.connect(fresh.owner_dsn)
    try:
        assert await conn.fetchval("SELECT to_regclass('kept') IS NOT NULL")
        assert await conn.fetchval("SELECT to_regclass('half_done') IS NULL")
        assert await conn.fetchval("SELECT array_agg(version) FROM schema_migrations") == ["0001"]
    finally:
        await conn.close()


def test_badly_named_files_are_refused(tmp_path):
    (tmp_path / "1_init.sql").write_text("SELECT 1;")
    with pytest.raises(MigrationError, match=r"1_init\.sql: migration files are named"):
        load_migrations(tmp_path)


def test_the_command_line_applies_and_reports(fresh):
    command = [sys.executable, "-m", "agentbox.api.migrate", "--dsn", fresh.owner_dsn]
    first = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"applied {len(load_migrations())} migration(s)" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == "applied 0 migration(s)"
    nobody_there = "postgresql://agentbox_owner:pw@127.0.0.1:1/agentbox"
    broken = subprocess.run([*command[:-1], nobody_there], capture_output=True, text=True, timeout=60)
    assert broken.returncode == 1 and broken.stderr.startswith("migrate: ")


async def test_sql_round_trip_through_every_table(app_db):
    keys = KeyRing.parse([generate_key_entry("k1")])
    await create_orgs(app_db, "smoke")
    async with app_db.tenant("smoke") as conn:
        await conn.execute("INSERT INTO users (id, email) VALUES ('u1', 'u1@example.com')")
        await conn.execute("INSERT INTO memberships (org_id, user_id, role) VALUES ('smoke', 'u1', 'admin')")
        config_id = await conn.fetchval(
            "INSERT INTO mcp_configurations (org_id, name, transport, url, auth_type) "
            "VALUES ('smoke', 'github', 'streamable-http', 'https://mcp.example/mcp', 'oauth') RETURNING id")
        where = CipherContext("smoke", "mcp_oauth_tokens", str(config_id), "access_token_enc")
        await conn.execute(
            "INSERT INTO mcp_oauth_tokens (configuration_id, org_id, issuer, resource, client_id, "
            "access_token_enc) "
            "VALUES ($1, 'smoke', 'https://as.example', 'https://mcp.example/mcp', 'c1', $2)",
            config_id, keys.encrypt("at-123", where))
        state_hash = bytes(range(32))
        verifier = CipherContext("smoke", "oauth_states", state_hash.hex(), "code_verifier_enc")
        await conn.execute(
            "INSERT INTO oauth_states (state_hash, org_id, user_id, configuration_id, issuer, resource, "
            "redirect_uri, code_verifier_enc, client_id, token_auth_method, token_endpoint) "
            "VALUES ($1, 'smoke', 'u1', $2, 'https://as.example', 'https://mcp.example/mcp', "
            "'https://app.example/cb', $3, 'c1', 'none', 'https://as.example/token')",
            state_hash, config_id, keys.encrypt("verifier", verifier))
        await conn.execute("INSERT INTO system_prompts (scope, org_id, user_id, name, content, is_template) "
                           "VALUES ('user', 'smoke', 'u1', 'mine', 'Hi {{ name }}', true)")

    async with app_db.tenant("smoke") as conn:
        stored = await conn.fetchval("SELECT access_token_enc FROM mcp_oauth_tokens")
        assert keys.decrypt_text(stored, where) == "at-123"
        summary = await conn.fetchrow("SELECT * FROM mcp_configuration_summaries WHERE id = $1", config_id)
        assert summary["name"] == "github" and "bearer_token_enc" not in summary.keys()
        consumed = await conn.fetchrow("SELECT * FROM oauth_consume_state($1)", state_hash)
        assert consumed["user_id"] == "u1" and consumed["consumed_at"] is not None
        again = await conn.fetchrow("SELECT * FROM oauth_consume_state($1)", state_hash)
        assert again["state_hash"] is None, "a state is single use"
        await conn.execute("UPDATE mcp_configurations SET status = 'needs-reauth' WHERE id = $1", config_id)
        assert await conn.fetchval("SELECT version FROM mcp_configurations WHERE id = $1", config_id) == 2
        await conn.execute("DELETE FROM mcp_configurations WHERE id = $1", config_id)
        assert await conn.fetchval("SELECT count(*) FROM mcp_oauth_tokens") == 0  # cascaded


async def test_an_expired_state_cannot_be_consumed_and_states_live_ten_minutes_at_most(app_db):
    await create_orgs(app_db, "states")
    async with app_db.tenant("states") as conn:
        config_id = await conn.fetchval(
            "INSERT INTO mcp_configurations (org_id, name, transport, url) "
            "VALUES ('states', 'x', 'sse', 'https://x.example') RETURNING id")
        insert = ("INSERT INTO oauth_states (state_hash, org_id, user_id, configuration_id, issuer, "
                  "resource, redirect_uri, code_verifier_enc, client_id, token_auth_method, "
                  "token_endpoint, created_at, expires_at) "
                  "VALUES ($1, 'states', 'u', $2, 'i', 'r', 'u', 'v1:k:x', 'c', 'none', 't', "
                  "now() - $3::interval, now() - $3::interval + $4::interval)")
        await conn.execute(insert, b"e" * 32, config_id, timedelta(minutes=11), timedelta(minutes=10))
        assert (await conn.fetchrow("SELECT * FROM oauth_consume_state($1)", b"e" * 32))["state_hash"] is None
        with pytest.raises(asyncpg.CheckViolationError):
            await conn.execute(insert, b"f" * 32, config_id, timedelta(0), timedelta(minutes=11))
