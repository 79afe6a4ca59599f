"""The whole OAuth flow through the API, against the real PostgreSQL and a real authorization server on
127.0.0.1: init, the provider's redirect, callback, refresh (race, rotation, invalid_grant), revocation,
and every bad callback. Kubernetes is not configured here (kube None): the Secret side is in
test_oauth_cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import parse_qs, urlencode, urlsplit

import asyncpg
import httpx
import pytest
import pytest_asyncio

from agentbox.api import audit, oauth
from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.crypto import CipherContext, KeyRing, generate_key_entry
from agentbox.api.db import Database
from agentbox.api.routers.oauth import refresh_due_connections
from agentbox.api.settings import Settings

from .authserver import AuthServer, Behaviour
from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

ORG, OTHER_ORG = "acme", "globex"
FRONTEND = "http://frontend.test/connections"
KEY_ENTRY = generate_key_entry("k1")


def bearer(sub: str, org: str = ORG, role: str = "user") -> dict[str, str]:
    # Minted at import, so valid for as long as a whole run may take to reach these tests.
    expires = int(time.time()) + 3 * 3600
    token = hs256(sub=sub, app_metadata={"org_id": org, "role": role}, exp=expires)
    return {"Authorization": f"Bearer {token}"}


ADMIN, USER = bearer("admin-1", role="admin"), bearer("user-1")
OTHER_ADMIN = bearer("admin-x", OTHER_ORG, "admin")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def superuser(postgres):
    conn = await asyncpg.connect(postgres.superuser_dsn)
    await conn.execute("INSERT INTO organizations (id, name) VALUES ($1, 'Acme'), ($2, 'Globex')",
                       ORG, OTHER_ORG)
    yield conn
    await conn.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def database(postgres):
    db = Database(postgres.app_dsn)
    yield db
    await db.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def other_replica_database(postgres):
    """A second API replica's pool on the same database."""
    db = Database(postgres.app_dsn)
    yield db
    await db.close()


@contextlib.asynccontextmanager
async def api_for(database: Database, **settings) -> AsyncIterator[tuple[httpx.AsyncClient, Services]]:
    settings.setdefault("mcp_test_allow_private_networks", True)  # the authorization server is on loopback
    shared = Services(
        settings=Settings(encryption_keys=[KEY_ENTRY], frontend_url=FRONTEND, public_url="http://api.test",
                          **settings),
        database=database, verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                                  hs256_secret=HS256_SECRET))
    app = create_app(services_override=shared)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test") as client:
        yield client, shared
    http = shared.extras.get("oauth_http")
    if http is not None:
        await http.aclose()


@contextlib.asynccontextmanager
async def provider(behaviour: Behaviour | None = None) -> AsyncIterator[AuthServer]:
    server = AuthServer(behaviour or Behaviour())
    async with serve(server.app()) as base:
        server.base_url = base
        yield server


async def new_configuration(superuser, url: str, org: str = ORG) -> uuid.UUID:
    return await superuser.fetchval(
        "INSERT INTO mcp_configurations (org_id, name, transport, url, auth_type) "
        "VALUES ($1, $2, 'streamable-http', $3, 'oauth') RETURNING id",
        org, f"srv-{uuid.uuid4().hex[:8]}", url)


async def audit_rows(superuser, org: str = ORG) -> list[asyncpg.Record]:
    return await superuser.fetch("SELECT action, outcome, actor_sub, target, reason, "
                                 "details::text AS details FROM audit_logs WHERE org_id = $1 ORDER BY seq",
                                 org)


async def platform_head(superuser) -> int:
    return await superuser.fetchval("SELECT coalesce(max(seq), 0) FROM audit_logs WHERE org_id IS NULL")


async def platform_rows(superuser, after_seq: int) -> list[asyncpg.Record]:
    return await superuser.fetch("SELECT org_id, action, outcome, reason, host(ip) AS ip, user_agent, "
                                 "details::text AS details FROM audit_logs "
                                 "WHERE org_id IS NULL AND seq > $1 ORDER BY seq", after_seq)


def refused(shared: Services, reason: str) -> float | None:
    return shared.metrics.registry.get_sample_value("agentbox_api_oauth_callbacks_refused_total",
                                                    {"reason": reason})


async def authorize(api: httpx.AsyncClient, server: AuthServer, configuration_id: uuid.UUID) -> str:
    """init, then the provider's consent page: the callback URL the browser would be sent to."""
    init = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                          json={"configurationId": str(configuration_id)})
    assert init.status_code == 200, init.text
    async with httpx.AsyncClient() as browser:
        consent = await browser.get(init.json()["authorizationUrl"])
    assert consent.status_code == 302, consent.text
    return consent.headers["location"]


async def connect(api, server, configuration_id) -> httpx.Response:
    callback = await api.get(await authorize(api, server, configuration_id))
    assert callback.status_code == 303, callback.text
    return callback


def token_cipher(configuration_id: uuid.UUID, column: str) -> CipherContext:
    return CipherContext(org_id=ORG, table="mcp_oauth_tokens", row_id=str(configuration_id), column=column)


async def stored_tokens(superuser, configuration_id) -> tuple[str | None, str | None]:
    row = await superuser.fetchrow("SELECT access_token_enc, refresh_token_enc FROM mcp_oauth_tokens "
                                   "WHERE configuration_id = $1", configuration_id)
    if row is None:
        return None, None
    keys = KeyRing.parse([KEY_ENTRY])
    return (keys.decrypt_text(row["access_token_enc"], token_cipher(configuration_id, "access_token_enc")),
            keys.decrypt_text(row["refresh_token_enc"], token_cipher(configuration_id, "refresh_token_enc")))


async def test_the_whole_flow_stores_tokens_encrypted_and_never_shows_them(database, superuser, caplog):
    caplog.set_level(logging.DEBUG)
    async with provider() as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        before = len(await audit_rows(superuser))
        init = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                              json={"configurationId": str(configuration_id)})
        assert init.status_code == 200, init.text
        body = init.json()
        query = parse_qs(urlsplit(body["authorizationUrl"]).query)
        assert query["code_challenge_method"] == ["S256"] and query["resource"] == [server.resource]
        assert query["redirect_uri"] == ["http://api.test/api/v1/mcp/oauth/callback"]
        assert query["scope"] == ["mcp:tools"]  # what the server's challenge asked for
        assert body["clientRegistration"] == "dynamic" and server.calls["register"] == 1
        async with httpx.AsyncClient() as browser:
            consent = await browser.get(body["authorizationUrl"])
        callback_url = consent.headers["location"]
        callback = await api.get(callback_url)
        assert callback.status_code == 303
        assert callback.headers["location"] == f"{FRONTEND}?oauth=connected&configuration={configuration_id}"
        exchange = server.token_requests[-1]
        assert exchange["grant_type"] == "authorization_code" and exchange["resource"] == server.resource
        assert oauth.code_challenge(exchange["code_verifier"]) == query["code_challenge"][0]

        access, refresh = await stored_tokens(superuser, configuration_id)
        assert access in server.access_tokens and refresh in server.refresh_tokens
        raw = await superuser.fetchrow("SELECT * FROM mcp_oauth_tokens WHERE configuration_id = $1",
                                       configuration_id)
        assert raw["access_token_enc"].startswith("v1:k1:") and access not in str(dict(raw))
        connection = await api.get(f"/api/v1/mcp/oauth/connections/{configuration_id}", headers=USER)
        assert connection.status_code == 200 and connection.json()["status"] == "connected"
        assert connection.json()["hasRefreshToken"] is True and connection.json()["connectedBy"] == "admin-1"

        rows = (await audit_rows(superuser))[before:]
        assert [(r["action"], r["outcome"]) for r in rows] == [("mcp.oauth.init", "success"),
                                                                ("mcp.oauth.callback", "success")]
        seen = " ".join([init.text, callback.text, callback.headers["location"], connection.text, caplog.text,
                         *(str(dict(r)) for r in rows)])
        assert access not in seen and refresh not in seen and exchange["code_verifier"] not in seen

        # The same callback again: the state is spent. 400, no token call, one denied row.
        calls = server.calls["token"]
        again = await api.get(callback_url)
        assert again.status_code == 400 and "already used" in again.json()["detail"]
        assert server.calls["token"] == calls
        last = (await audit_rows(superuser))[-1]
        assert (last["action"], last["outcome"], last["actor_sub"]) == (
            "mcp.oauth.callback", "denied", "admin-1")


async def test_bad_callbacks_get_400_and_never_reach_the_token_endpoint(database, superuser):
    platform_rows_before = await platform_head(superuser)
    async with provider() as server, api_for(database) as (api, shared):
        configuration_id = await new_configuration(superuser, server.resource)
        callback_url = await authorize(api, server, configuration_id)
        state = parse_qs(urlsplit(callback_url).query)["state"][0]
        code = parse_qs(urlsplit(callback_url).query)["code"][0]
        path = "/api/v1/mcp/oauth/callback"
        cases = [
            ({"code": code}, "missing"),
            ({"code": code, "state": "globex." + state.partition(".")[2]}, "unknown"),  # foreign org
            ({"code": code, "state": state[:-4] + "AAAA"}, "unknown"),
            ({"code": code, "state": state, "iss": "https://evil.example"}, "another issuer"),
        ]
        for params, message in cases:
            response = await api.get(path, params=params)
            assert response.status_code == 400 and message in response.json()["detail"], response.text
        assert server.calls["token"] == 0
        # Strangers' callbacks (no usable state, no token) are counted and audited in the platform chain.
        assert (refused(shared, "missing_state"), refused(shared, "unknown_state")) == (1, 2)
        rows = await platform_rows(superuser, platform_rows_before)
        assert [r["reason"] for r in rows] == ["400: the state parameter is missing",
                                               "400: the state is unknown", "400: the state is unknown"]
        assert {(r["action"], r["outcome"], r["ip"]) for r in rows} == {
            ("mcp.oauth.callback", "denied", "127.0.0.1")}
        assert [json.loads(r["details"]).get("claimed_org") for r in rows] == [None, "globex", "acme"]

        # Bound to the user: another user of the org relaying the callback with their token is refused.
        callback_url = await authorize(api, server, configuration_id)
        response = await api.get(callback_url, headers=USER)
        assert response.status_code == 400 and "another user" in response.json()["detail"]

        # Expired: ten minutes later (moved back in time with the triggers off, as a superuser may).
        callback_url = await authorize(api, server, configuration_id)
        expired = parse_qs(urlsplit(callback_url).query)["state"][0]
        async with superuser.transaction():
            await superuser.execute("SET LOCAL session_replication_role = replica")
            await superuser.execute("UPDATE oauth_states SET created_at = now() - interval '11 minutes', "
                                    "expires_at = now() - interval '1 minute' WHERE state_hash = $1",
                                    oauth.state_hash(expired))
        response = await api.get(callback_url)
        assert response.status_code == 400 and "expired" in response.json()["detail"]
        assert server.calls["token"] == 0
        assert await superuser.fetchval("SELECT count(*) FROM mcp_oauth_tokens WHERE configuration_id = $1",
                                        configuration_id) == 0
        rows = [r for r in await audit_rows(superuser) if r["action"] == "mcp.oauth.callback"]
        assert [r["reason"] for r in rows[-3:]] == [
            "400: the authorization response came from another issuer (iss mismatch)",
            "400: the state was issued to another user", "400: the state was expired"]


def without_iss(callback_url: str) -> str:
    parts = urlsplit(callback_url)
    query = {name: values for name, values in parse_qs(parts.query).items() if name != "iss"}
    return parts._replace(query=urlencode(query, doseq=True)).geturl()


async def test_a_callback_without_iss_is_refused_when_the_issuer_promised_it(database, superuser):
    async with provider() as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        callback_url = await authorize(api, server, configuration_id)
        state = parse_qs(urlsplit(callback_url).query)["state"][0]
        assert await superuser.fetchval("SELECT iss_required FROM oauth_states WHERE state_hash = $1",
                                        oauth.state_hash(state)) is True
        response = await api.get(without_iss(callback_url))
        assert response.status_code == 400 and "lacks iss" in response.json()["detail"], response.text
        assert server.calls["token"] == 0
        assert await superuser.fetchval("SELECT count(*) FROM mcp_oauth_tokens WHERE configuration_id = $1",
                                        configuration_id) == 0
        last = (await audit_rows(superuser))[-1]
        assert (last["action"], last["outcome"], last["actor_sub"]) == ("mcp.oauth.callback", "denied",
                                                                        "admin-1")
        assert "RFC 9207" in last["reason"]
        # The promise is part of a pending state and as immutable as the rest of it.
        pending = parse_qs(urlsplit(await authorize(api, server, configuration_id)).query)["state"][0]
        with pytest.raises(asyncpg.CheckViolationError, match="immutable"):
            await superuser.execute("UPDATE oauth_states SET iss_required = false WHERE state_hash = $1",
                                    oauth.state_hash(pending))

    # An issuer that never promised iss: its absence is fine.
    async with provider(Behaviour(iss_parameter=False)) as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        callback_url = await authorize(api, server, configuration_id)
        assert "iss" not in parse_qs(urlsplit(callback_url).query)
        callback = await api.get(callback_url)
        assert callback.status_code == 303 and "oauth=connected" in callback.headers["location"]


async def test_strangers_callbacks_reach_the_platform_chain_at_a_bounded_rate(database, superuser):
    path = "/api/v1/mcp/oauth/callback"
    before = await platform_head(superuser)
    async with api_for(database, oauth_stranger_callback_audit_per_minute=2) as (api, shared):
        for _ in range(5):
            response = await api.get(path, params={"state": "not-ours", "code": "x"},
                                     headers={"User-Agent": "flood/1.0"})
            assert response.status_code == 400 and "malformed" in response.json()["detail"]
        assert refused(shared, "missing_state") == 5  # the metric counts every one
        rows = await platform_rows(superuser, before)
        assert [(r["reason"], r["user_agent"], r["org_id"]) for r in rows] == [
            ("400: the state parameter is malformed", "flood/1.0", None)] * 2
        assert [json.loads(r["details"])["suppressed"] for r in rows] == [0, 0]
        # A minute later the bucket has refilled: the next row tells how many were left out.
        ration = shared.extras["oauth_stranger_callback_audit"]
        ration.clock = lambda: time.monotonic() + 60
        response = await api.get(path, params={"state": "acme." + "A" * 43})
        assert response.status_code == 400 and "unknown" in response.json()["detail"]
        last = (await platform_rows(superuser, before))[-1]
        assert last["reason"] == "400: the state is unknown"
        assert json.loads(last["details"]) == {"suppressed": 3, "claimed_org": "acme"}
    assert (await audit.verify_chain(database, None)).ok


async def test_provider_error_and_provider_down_end_cleanly(database, superuser):
    async with api_for(database) as (api, _):
        async with provider() as server:
            configuration_id = await new_configuration(superuser, server.resource)
            callback_url = await authorize(api, server, configuration_id)
            state = parse_qs(urlsplit(callback_url).query)["state"][0]
            denied = await api.get("/api/v1/mcp/oauth/callback",
                                   params={"state": state, "iss": server.issuer, "error": "access_denied",
                                           "error_description": "the user said no"})
            assert denied.status_code == 303
            assert parse_qs(urlsplit(denied.headers["location"]).query)["error"] == ["access_denied"]
            callback_url = await authorize(api, server, configuration_id)
        # The provider is gone before the browser comes back.
        down = await api.get(callback_url)
        assert down.status_code == 303
        assert parse_qs(urlsplit(down.headers["location"]).query)["error"] == ["temporarily_unavailable"]
        assert await superuser.fetchval("SELECT count(*) FROM mcp_oauth_tokens WHERE configuration_id = $1",
                                        configuration_id) == 0
        rows = [r for r in await audit_rows(superuser) if r["action"] == "mcp.oauth.callback"]
        assert [r["outcome"] for r in rows[-2:]] == ["failed", "failed"]
        assert "access_denied" in rows[-2]["reason"] and "could not be reached" in rows[-1]["reason"]
        # init against a provider that is down: 502, audited, nothing stored.
        states = await superuser.fetchval("SELECT count(*) FROM oauth_states")
        response = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                                  json={"configurationId": str(configuration_id)})
        assert response.status_code == 502
        assert await superuser.fetchval("SELECT count(*) FROM oauth_states") == states
        assert (await audit_rows(superuser))[-1]["outcome"] == "failed"


async def test_a_lying_provider_and_one_without_pkce_are_refused_at_init(database, superuser):
    async with api_for(database) as (api, _):
        for behaviour, message in [(Behaviour(lie_about_issuer=True), "names issuer"),
                                   (Behaviour(pkce_methods=None), "code_challenge_methods_supported")]:
            async with provider(behaviour) as server:
                configuration_id = await new_configuration(superuser, server.resource)
                response = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                                          json={"configurationId": str(configuration_id)})
                assert response.status_code == 502 and message in response.json()["detail"]
                assert server.calls["register"] == 0 and server.calls["authorize"] == 0


async def test_preregistered_client_comes_before_dynamic_registration(database, superuser):
    async with provider() as server:
        server.clients["pre-1"] = {"secret": "pre-secret", "redirect_uris": [
            "http://api.test/api/v1/mcp/oauth/callback"]}
        clients = f'{{"{server.issuer}": {{"clientId": "pre-1", "clientSecret": "pre-secret"}}}}'
        async with api_for(database, oauth_clients=clients) as (api, _):
            configuration_id = await new_configuration(superuser, server.resource)
            init = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                                  json={"configurationId": str(configuration_id)})
            assert init.json()["clientRegistration"] == "preregistered" and server.calls["register"] == 0
            assert parse_qs(urlsplit(init.json()["authorizationUrl"]).query)["client_id"] == ["pre-1"]


async def test_ten_concurrent_refreshes_of_an_expired_token_make_one_token_call(database, superuser):
    async with provider(Behaviour(token_delay=0.2)) as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        await connect(api, server, configuration_id)
        old_access, old_refresh = await stored_tokens(superuser, configuration_id)
        await superuser.execute("UPDATE mcp_oauth_tokens SET expires_at = now() - interval '1 minute' "
                                "WHERE configuration_id = $1", configuration_id)
        before = server.calls["refresh"]
        audit_before = len(await audit_rows(superuser))
        responses = await asyncio.gather(*[
            api.post("/api/v1/mcp/oauth/refresh", headers=USER,
                     json={"configurationId": str(configuration_id)})
            for _ in range(10)])
        assert [r.status_code for r in responses] == [200] * 10
        assert server.calls["refresh"] - before == 1
        assert sum(r.json()["refreshed"] for r in responses) == 1
        assert server.token_requests[-1]["resource"] == server.resource
        new_access, new_refresh = await stored_tokens(superuser, configuration_id)
        # Rotation: the new refresh token is stored, the old one is dead at the provider.
        assert new_access != old_access and new_refresh != old_refresh
        assert old_refresh not in server.refresh_tokens and new_refresh in server.refresh_tokens
        assert len(await audit_rows(superuser)) - audit_before == 10
        assert all(old_access not in r.text and new_access not in r.text for r in responses)


def refresh_request(api: httpx.AsyncClient, configuration_id: uuid.UUID, force: bool = False):
    return api.post("/api/v1/mcp/oauth/refresh", headers=USER,
                    json={"configurationId": str(configuration_id), "force": force})


async def test_two_replicas_refreshing_at_once_make_one_token_call(database, other_replica_database,
                                                                   superuser):
    # Each replica has its own Services, so its own in-process locks: only the database serialises them.
    async with provider(Behaviour(token_delay=0.2)) as server, api_for(database) as (first, _), \
            api_for(other_replica_database) as (second, _):
        configuration_id = await new_configuration(superuser, server.resource)
        await connect(first, server, configuration_id)
        await superuser.execute("UPDATE mcp_oauth_tokens SET expires_at = now() - interval '1 minute' "
                                "WHERE configuration_id = $1", configuration_id)
        before = server.calls["refresh"]
        responses = await asyncio.gather(*[refresh_request(replica, configuration_id)
                                           for replica in [first, second] * 5])
        assert [r.status_code for r in responses] == [200] * 10, [r.text for r in responses]
        assert server.calls["refresh"] - before == 1
        assert sum(r.json()["refreshed"] for r in responses) == 1
        assert await superuser.fetchval("SELECT status FROM mcp_configurations WHERE id = $1",
                                        configuration_id) != "needs-reauth"
        access, refresh = await stored_tokens(superuser, configuration_id)
        assert access in server.access_tokens and refresh in server.refresh_tokens


async def test_a_refresh_waits_for_another_replicas_turn_only_so_long(database, other_replica_database,
                                                                      superuser):
    async with provider(Behaviour(token_delay=1.5)) as server, api_for(database) as (first, _), \
            api_for(other_replica_database, oauth_refresh_lock_timeout_seconds=0.3) as (second, _):
        configuration_id = await new_configuration(superuser, server.resource)
        await connect(first, server, configuration_id)
        calls = server.calls["refresh"]
        token_calls = server.calls["token"]  # counted on arrival; "refresh" once answered
        slow = asyncio.create_task(refresh_request(first, configuration_id, force=True))
        while server.calls["token"] == token_calls:  # the first replica holds the turn, in the token call
            await asyncio.sleep(0.01)
        started = time.monotonic()
        waited = await refresh_request(second, configuration_id, force=True)
        elapsed = time.monotonic() - started
        assert waited.status_code == 409 and "still running" in waited.json()["detail"], waited.text
        assert waited.headers["retry-after"] == "2" and elapsed < 1.2
        assert (await slow).status_code == 200 and server.calls["refresh"] == calls + 1
        last = (await audit_rows(superuser))[-2:]
        assert {(r["action"], r["outcome"]) for r in last} == {("mcp.oauth.refresh", "failed"),
                                                               ("mcp.oauth.refresh", "success")}


async def test_invalid_grant_marks_the_configuration_needs_reauth(database, superuser):
    async with provider() as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        await connect(api, server, configuration_id)
        server.refresh_tokens.clear()  # the provider forgot the grant (user revoked the app there)
        response = await api.post("/api/v1/mcp/oauth/refresh", headers=USER,
                                  json={"configurationId": str(configuration_id), "force": True})
        assert response.status_code == 409 and "re-authorisation" in response.json()["detail"]
        status = await superuser.fetchval("SELECT status FROM mcp_configuration_summaries WHERE id = $1",
                                          configuration_id)
        assert status == "needs-reauth"
        connection = await api.get(f"/api/v1/mcp/oauth/connections/{configuration_id}", headers=USER)
        assert connection.json()["status"] == "needs-reauth"
        last = (await audit_rows(superuser))[-1]
        assert (last["action"], last["outcome"]) == ("mcp.oauth.refresh", "failed")
        # Connecting again clears it.
        await connect(api, server, configuration_id)
        connection = await api.get(f"/api/v1/mcp/oauth/connections/{configuration_id}", headers=USER)
        assert connection.json()["status"] == "connected"


async def test_background_pass_refreshes_tokens_about_to_expire(database, superuser):
    async with provider() as server, api_for(database, oauth_refresh_window_seconds=120) as (api, shared):
        soon = await new_configuration(superuser, server.resource)
        later = await new_configuration(superuser, server.resource)
        for configuration_id in (soon, later):
            await connect(api, server, configuration_id)
        await superuser.execute("UPDATE mcp_oauth_tokens SET expires_at = now() + interval '30 seconds' "
                                "WHERE configuration_id = $1", soon)
        before = await stored_tokens(superuser, soon), await stored_tokens(superuser, later)
        assert await refresh_due_connections(shared) == 1
        assert await stored_tokens(superuser, soon) != before[0]
        assert await stored_tokens(superuser, later) == before[1]
        last = (await audit_rows(superuser))[-1]
        assert (last["action"], last["outcome"], last["actor_sub"]) == (
            "mcp.oauth.refresh", "success", "agentbox:oauth-refresher")


async def test_revoke_at_the_provider_and_forget_the_tokens(database, superuser):
    async with provider() as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        await connect(api, server, configuration_id)
        access, refresh = await stored_tokens(superuser, configuration_id)
        assert (await api.post("/api/v1/mcp/oauth/revoke", headers=USER,
                               json={"configurationId": str(configuration_id)})).status_code == 403
        probe = await api.post("/api/v1/mcp/oauth/revoke", headers=OTHER_ADMIN,
                               json={"configurationId": str(configuration_id)})
        assert probe.status_code == 404
        response = await api.post("/api/v1/mcp/oauth/revoke", headers=ADMIN,
                                  json={"configurationId": str(configuration_id)})
        assert response.status_code == 200 and response.json()["revokedAtServer"] is True
        assert server.revoked == [refresh, access]
        assert await stored_tokens(superuser, configuration_id) == (None, None)
        gone = await api.get(f"/api/v1/mcp/oauth/connections/{configuration_id}", headers=USER)
        assert gone.status_code == 404
        rows = await audit_rows(superuser)
        assert [(r["action"], r["outcome"]) for r in rows[-2:]] == [("mcp.oauth.revoke", "denied"),
                                                                      ("mcp.oauth.revoke", "success")]
        other = await audit_rows(superuser, OTHER_ORG)
        assert (other[-1]["action"], other[-1]["outcome"]) == ("mcp.oauth.revoke", "denied")


# Where the API connects: every URL of the flow is held to the connection test's address policy ----------

LOOPBACK_REFUSED = {"mcp_test_allow_private_networks": False}  # the default outside development


def refused_problem(response: httpx.Response, *what: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert all(part in problem["detail"] for part in what), problem["detail"]
    assert "which the API does not contact" in problem["detail"]
    assert problem["errors"][0]["field"] == "body.configurationId"


async def test_init_does_not_contact_a_loopback_mcp_server_unless_private_networks_are_allowed(
        database, superuser):
    async with provider() as server, api_for(database, **LOOPBACK_REFUSED) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        states = await superuser.fetchval("SELECT count(*) FROM oauth_states")
        response = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                                  json={"configurationId": str(configuration_id)})
        refused_problem(response, "the MCP server", server.resource, "a loopback address (127.0.0.1)")
        assert sum(server.calls.values()) == 0
        assert await superuser.fetchval("SELECT count(*) FROM oauth_states") == states


@pytest.mark.parametrize(("behaviour", "what"), [
    (Behaviour(resource_metadata_url="https://169.254.169.254/latest/meta-data/"), "the metadata document"),
    (Behaviour(metadata_overrides={"registration_endpoint": "https://169.254.169.254/register"}),
     "the registration endpoint"),
    (Behaviour(metadata_overrides={"registration_endpoint": "https://[fe80::1]/register"}),
     "the registration endpoint"),
], ids=["resource-metadata", "registration", "registration-ipv6"])
async def test_urls_the_servers_name_are_checked_too(database, superuser, behaviour, what):
    # Private networks allowed (the provider is on loopback); link-local addresses are refused always.
    async with provider(behaviour) as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        response = await api.post("/api/v1/mcp/oauth/init", headers=ADMIN,
                                  json={"configurationId": str(configuration_id)})
        refused_problem(response, what, "a link-local (cloud metadata) address")
        assert server.calls["register"] == 0


async def test_the_code_is_not_exchanged_at_a_token_endpoint_on_a_refused_address(database, superuser):
    behaviour = Behaviour(metadata_overrides={"token_endpoint": "https://169.254.169.254/token"})
    async with provider(behaviour) as server, api_for(database) as (api, _):
        configuration_id = await new_configuration(superuser, server.resource)
        callback = await api.get(await authorize(api, server, configuration_id))
        assert callback.status_code == 303, callback.text
        outcome = parse_qs(urlsplit(callback.headers["location"]).query)
        assert outcome["error"] == ["server_error"] and "link-local" in outcome["message"][0]
        assert server.calls["token"] == 0
        assert await stored_tokens(superuser, configuration_id) == (None, None)


async def test_refresh_and_revoke_check_the_stored_endpoints_address_again(database, superuser):
    # Connected while loopback was allowed; a replica that refuses it (as if the provider's name now
    # resolved to a loopback address) neither refreshes nor revokes there.
    async with provider() as server:
        async with api_for(database) as (api, _):
            configuration_id = await new_configuration(superuser, server.resource)
            await connect(api, server, configuration_id)
        before = await stored_tokens(superuser, configuration_id)
        async with api_for(database, **LOOPBACK_REFUSED) as (api, _):
            response = await refresh_request(api, configuration_id, force=True)
            refused_problem(response, "the token endpoint", f"{server.issuer}/token", "a loopback address")
            assert server.calls["refresh"] == 0 and await stored_tokens(superuser, configuration_id) == before
            revoked = await api.post("/api/v1/mcp/oauth/revoke", headers=ADMIN,
                                     json={"configurationId": str(configuration_id)})
            assert revoked.status_code == 200 and revoked.json()["revokedAtServer"] is False
            assert "the revocation endpoint" in revoked.json()["detail"]
            assert "a loopback address" in revoked.json()["detail"]
            assert server.calls["revoke"] == 0
