"""Row-level security on the real PostgreSQL (security.md, "PostgreSQL row-level security")."""

import asyncio

import asyncpg
import pytest

from agentbox.api.db import Database, InvalidOrgId
from agentbox.api.migrate import APP_ROLE

from .conftest import create_orgs

TENANT_TABLES = ["organizations", "users", "memberships", "mcp_configurations", "mcp_oauth_tokens",
                 "oauth_states", "system_prompts", "audit_logs", "provider_keys"]


@pytest.fixture(scope="module", autouse=True)
async def seeded(app_db):
    await create_orgs(app_db, "org-a", "org-b")
    for org in ("org-a", "org-b"):
        async with app_db.tenant(org) as conn:
            for i in range(3):
                await conn.execute(
                    "INSERT INTO mcp_configurations (org_id, name, transport, url) "
                    "VALUES ($1, $2, 'sse', $3)",
                    org, f"server-{i}", f"https://{org}.example/{i}")
            await conn.execute(
                "INSERT INTO system_prompts (scope, org_id, name, content) "
                "VALUES ('org', $1, 'house', $1)", org)
    async with app_db.platform() as conn:
        await conn.execute("INSERT INTO system_prompts (scope, name, content) "
                           "VALUES ('global', 'base', 'be kind')")


async def test_catalog_shows_the_app_role_is_not_owner_superuser_or_bypassrls(postgres):
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        role = await conn.fetchrow("SELECT rolsuper, rolbypassrls, rolcanlogin, rolcreaterole, rolcreatedb "
                                   "FROM pg_roles WHERE rolname = $1", APP_ROLE)
        assert dict(role) == {"rolsuper": False, "rolbypassrls": False, "rolcanlogin": True,
                              "rolcreaterole": False, "rolcreatedb": False}
        owned = await conn.fetchval(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND pg_get_userbyid(c.relowner) = $1", APP_ROLE)
        assert owned == 0
        assert await conn.fetchval("SELECT datdba::regrole::text FROM pg_database WHERE datname = "
                                   "current_database()") != APP_ROLE
    finally:
        await conn.close()


async def test_every_tenant_table_enables_and_forces_row_security_with_checked_policies(postgres):
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        flags = {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"]) for r in await conn.fetch(
            "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class WHERE relname = ANY($1)",
            TENANT_TABLES)}
        assert flags == {table: (True, True) for table in TENANT_TABLES}
        # Every policy that lets rows in (INSERT, UPDATE, ALL) has a WITH CHECK.
        unchecked = await conn.fetch(
            "SELECT tablename, policyname FROM pg_policies WHERE cmd IN ('INSERT', 'UPDATE', 'ALL') "
            "AND with_check IS NULL")
        assert unchecked == []
        # Every table in the schema that holds an org column is covered.
        with_org = {r["table_name"] for r in await conn.fetch(
            "SELECT c.table_name FROM information_schema.columns c "
            "JOIN pg_class t ON t.relname = c.table_name "
            "WHERE c.table_schema = 'public' AND c.column_name = 'org_id' AND t.relkind IN ('r', 'p') "
            "AND NOT t.relispartition")}
        assert with_org <= set(TENANT_TABLES)
    finally:
        await conn.close()


async def test_views_run_with_the_callers_rights_and_truncate_is_never_granted(postgres):
    conn = await asyncpg.connect(postgres.owner_dsn)
    try:
        views = await conn.fetch("SELECT c.relname, c.reloptions FROM pg_class c JOIN pg_namespace n "
                                 "ON n.oid = c.relnamespace WHERE n.nspname = 'public' AND c.relkind = 'v'")
        assert views, "expected at least one view"
        for view in views:
            assert "security_invoker=true" in (view["reloptions"] or []), view["relname"]
        truncatable = await conn.fetch(
            "SELECT table_name FROM information_schema.role_table_grants "
            "WHERE grantee = $1 AND privilege_type = 'TRUNCATE'", APP_ROLE)
        assert truncatable == []
    finally:
        await conn.close()


async def test_truncate_as_the_app_role_is_refused(app_db):
    for table in TENANT_TABLES:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with app_db.tenant("org-a") as conn:
                await conn.execute(f"TRUNCATE {table}")


async def test_a_query_with_no_context_returns_nothing(postgres):
    conn = await asyncpg.connect(postgres.app_dsn)
    try:
        for table in TENANT_TABLES:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0, table  # noqa: S608 (constants)
        assert await conn.fetchval("SELECT count(*) FROM mcp_configuration_summaries") == 0
    finally:
        await conn.close()


async def test_each_tenant_sees_only_its_rows_and_the_global_prompts(app_db):
    for org in ("org-a", "org-b"):
        async with app_db.tenant(org) as conn:
            assert {r["org_id"] for r in await conn.fetch("SELECT org_id FROM mcp_configurations")} == {org}
            assert {r["org_id"] for r in await conn.fetch("SELECT org_id FROM mcp_configuration_summaries")} \
                == {org}
            assert await conn.fetchval("SELECT count(*) FROM organizations") == 1
            rows = await conn.fetch("SELECT scope, org_id FROM system_prompts")
            prompts = {(r["scope"], r["org_id"]) for r in rows}
            assert prompts == {("global", None), ("org", org)}


async def test_pool_of_one_with_two_tenants_interleaved_gives_zero_cross_tenant_rows(postgres):
    async with Database(postgres.app_dsn, max_size=1) as db:
        pids = set()
        leaked = []

        async def read(org: str) -> None:
            async with db.tenant(org) as conn:
                pids.add(await conn.fetchval("SELECT pg_backend_pid()"))
                await asyncio.sleep(0)
                leaked.extend(r["org_id"] for r in await conn.fetch("SELECT org_id FROM mcp_configurations")
                              if r["org_id"] != org)

        await asyncio.gather(*(read("org-a" if i % 2 else "org-b") for i in range(200)))
        assert len(pids) == 1, "the test needs every transaction on the same connection"
        assert leaked == []


async def test_after_commit_the_context_is_empty(postgres):
    async with Database(postgres.app_dsn, max_size=1) as db:
        async with db.tenant("org-a") as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            assert await conn.fetchval("SELECT current_setting('app.current_org', true)") == "org-a"
        async with db.platform() as conn:  # the same pooled connection, next transaction
            assert await conn.fetchval("SELECT pg_backend_pid()") == pid
            assert await conn.fetchval("SELECT current_setting('app.current_org', true)") == ""
            assert await conn.fetchval("SELECT count(*) FROM mcp_configurations") == 0


async def test_inserting_or_moving_a_row_into_another_org_is_refused(app_db):
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_db.tenant("org-a") as conn:
            await conn.execute("INSERT INTO mcp_configurations (org_id, name, transport, url) "
                               "VALUES ('org-b', 'sneaky', 'sse', 'https://x')")
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
        async with app_db.tenant("org-a") as conn:
            await conn.execute("UPDATE mcp_configurations SET org_id = 'org-b' WHERE name = 'server-0'")
    async with app_db.tenant("org-a") as conn:  # another org's rows are simply not there to change
        assert await conn.execute("DELETE FROM mcp_configurations WHERE org_id = 'org-b'") == "DELETE 0"
    async with app_db.tenant("org-b") as conn:
        assert await conn.fetchval("SELECT count(*) FROM mcp_configurations") == 3


async def test_global_prompts_are_written_only_in_the_platform_context(app_db):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with app_db.tenant("org-a") as conn:
            await conn.execute("INSERT INTO system_prompts (scope, name, content) "
                               "VALUES ('global', 'x', 'y')")
    async with app_db.tenant("org-a") as conn:
        assert await conn.execute("UPDATE system_prompts SET content = 'pwned' WHERE scope = 'global'") \
            == "UPDATE 0"
    async with app_db.platform() as conn:
        updated = await conn.execute("UPDATE system_prompts SET content = 'be kinder' WHERE scope = 'global'")
        assert updated == "UPDATE 1"
        assert await conn.fetchval("SELECT version FROM system_prompts WHERE scope = 'global'") == 2
        # The platform context alone sees no tenant's rows.
        assert await conn.fetchval("SELECT count(*) FROM mcp_configurations") == 0


async def test_only_the_platform_creates_organizations(app_db):
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with app_db.tenant("org-a") as conn:
            await conn.execute("INSERT INTO organizations (id, name) VALUES ('org-c', 'C')")


async def test_users_are_visible_through_memberships_only(app_db):
    async with app_db.tenant("org-a") as conn:
        await conn.execute("INSERT INTO users (id, email) VALUES ('alice', 'a@example.com')")
        await conn.execute("INSERT INTO memberships (org_id, user_id, role) "
                           "VALUES ('org-a', 'alice', 'admin')")
        assert await conn.fetchval("SELECT count(*) FROM users") == 1
    async with app_db.tenant("org-b") as conn:
        assert await conn.fetchval("SELECT count(*) FROM users") == 0
        assert await conn.execute("UPDATE users SET email = 'x@evil' WHERE id = 'alice'") == "UPDATE 0"


async def test_a_bad_org_id_never_reaches_sql(app_db):
    for bad in ("", "Org", "a;drop table users", "-a", "a" * 57, "../x"):
        with pytest.raises(InvalidOrgId, match="must be a DNS label"):
            async with app_db.tenant(bad):
                pass
