"""The OAuth callback with no frontend configured: its outcome is the answer itself, against PostgreSQL."""

from __future__ import annotations

import asyncpg
import httpx
import pytest_asyncio

from agentbox.api import oauth
from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.crypto import generate_key_entry
from agentbox.api.db import Database
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER

ORG = "initech"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def superuser(postgres):
    conn = await asyncpg.connect(postgres.superuser_dsn)
    await conn.execute("INSERT INTO organizations (id, name) VALUES ($1, 'Initech')", ORG)
    yield conn
    await conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(postgres, superuser):
    database = Database(postgres.app_dsn)
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET)
    settings = Settings(encryption_keys=[generate_key_entry("k1")], frontend_url=None)
    app = create_app(services_override=Services(settings=settings, database=database, verifier=verifier))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test") as client:
        yield client
    await database.close()


async def issued_state(superuser, user: str = "admin-i") -> tuple[str, str]:
    """A state as init leaves it (written directly: the provider is never called on these paths)."""
    configuration_id = await superuser.fetchval(
        "INSERT INTO mcp_configurations (org_id, name, transport, url, auth_type) "
        "VALUES ($1, 'srv', 'streamable-http', 'https://mcp.example.test/mcp', 'oauth') "
        "ON CONFLICT (org_id, name) DO UPDATE SET url = EXCLUDED.url RETURNING id::text", ORG)
    state = oauth.new_state(ORG)
    await superuser.execute(
        "INSERT INTO oauth_states (state_hash, org_id, user_id, configuration_id, issuer, resource, "
        "redirect_uri, code_verifier_enc, client_id, token_auth_method, token_endpoint) "
        "VALUES ($1, $2, $3, $4, 'https://as.example.test', 'https://mcp.example.test/mcp', "
        "'http://api.test/api/v1/mcp/oauth/callback', 'v1:unused', 'client', 'none', "
        "'https://as.example.test/token')", oauth.state_hash(state), ORG, user, configuration_id)
    return state, configuration_id


async def test_a_provider_error_is_a_502_problem_without_a_frontend(api, superuser):
    state, configuration_id = await issued_state(superuser)
    response = await api.get("/api/v1/mcp/oauth/callback",
                             params={"state": state, "error": "access_denied", "error_description": "no"})
    assert response.status_code == 502, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert (problem["status"], problem["title"]) == (502, "Bad Gateway")
    assert (problem["outcome"], problem["error"], problem["configuration"]) == (
        "error", "access_denied", configuration_id)
    assert "access_denied" in problem["detail"] and problem["request_id"] == response.headers["x-request-id"]


async def test_the_callback_declares_its_502(api):
    spec = (await api.get("/openapi.json")).json()
    answers = spec["paths"]["/api/v1/mcp/oauth/callback"]["get"]["responses"]
    assert "application/problem+json" in answers["502"]["content"]


async def test_the_callback_row_names_the_role_of_the_user_who_started_the_flow(api, superuser):
    state, _configuration_id = await issued_state(superuser, user="admin-j")
    await api.get("/api/v1/mcp/oauth/callback", params={"state": state, "error": "access_denied"})
    row = await superuser.fetchrow("SELECT actor_sub, actor_role, outcome FROM audit_logs WHERE org_id = $1 "
                                   "AND action = 'mcp.oauth.callback' ORDER BY seq DESC LIMIT 1", ORG)
    # Only org admins start flows (init), so the browser's callback acts for an admin.
    assert tuple(row) == ("admin-j", "admin", "failed")
