"""Provider keys over HTTP against the real PostgreSQL and cluster: sealed at rest, rendered into a Secret
only, never answered; a session references the user's own key, else the org's, and never holds it."""

from __future__ import annotations

import base64
import json
import logging
import secrets

import asyncpg
import httpx
import pytest_asyncio
from kubernetes_asyncio import client

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.crypto import generate_key_entry
from agentbox.api.db import Database
from agentbox.api.kube import Kube as ApiKube
from agentbox.api.provider_keys import secret_name
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256

SUFFIX = secrets.token_hex(3)
ORG_A, ORG_B, ORG_NO_NAMESPACE = f"pka{SUFFIX}", f"pkb{SUFFIX}", f"pkc{SUFFIX}"
ORG_KEY = "sk-ant-org-" + secrets.token_hex(16)
USER_KEY = "sk-ant-user-" + secrets.token_hex(16)
OTHER_KEY = "sk-ant-other-" + secrets.token_hex(16)
KEYS = (ORG_KEY, USER_KEY, OTHER_KEY)
BASE = "/api/v1/provider-keys"


def bearer(sub: str, org: str, role: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {hs256(sub=sub, app_metadata={'org_id': org, 'role': role})}"}


ADMIN_A, ALICE, BOB = bearer("admin-a", ORG_A, "admin"), bearer("alice", ORG_A), bearer("bob", ORG_A)
ADMIN_B = bearer("admin-b", ORG_B, "admin")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(postgres, kube):
    superuser = await asyncpg.connect(postgres.superuser_dsn)
    await superuser.executemany("INSERT INTO organizations (id, name) VALUES ($1, $1)",
                                [(ORG_A,), (ORG_B,), (ORG_NO_NAMESPACE,)])
    database = Database(postgres.app_dsn)
    api_client = client.ApiClient(configuration=kube._configuration)
    cluster = ApiKube(api_client)
    for org in (ORG_A, ORG_B):
        await cluster.ensure_tenant_namespace(f"tenant-{org}", org)
    services = Services(settings=Settings(encryption_keys=[generate_key_entry("k1")]), database=database,
                        kube=cluster, verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                                             hs256_secret=HS256_SECRET))
    app = create_app(services_override=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test") as api:
        yield api, cluster, superuser
    for org in (ORG_A, ORG_B):
        await kube.kubectl("delete", "namespace", f"tenant-{org}", "--ignore-not-found", "--wait=false")
    await api_client.close()
    await database.close()
    await superuser.close()


def secret_values(secret: client.V1Secret) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


async def test_keys_are_sealed_at_rest_rendered_into_a_secret_and_never_answered(setup, caplog):
    api, cluster, superuser = setup
    caplog.set_level(logging.DEBUG)
    namespace = f"tenant-{ORG_A}"
    refused = await api.put(f"{BASE}/org/anthropic", headers=ALICE, json={"apiKey": ORG_KEY})
    assert refused.status_code == 403, "only admins set the org's key"
    org_set = await api.put(f"{BASE}/org/anthropic", headers=ADMIN_A, json={"apiKey": ORG_KEY})
    assert org_set.status_code == 200, org_set.text
    assert org_set.json()["scope"] == "org" and org_set.json()["provider"] == "anthropic"
    user_set = await api.put(f"{BASE}/user/anthropic", headers=ALICE, json={"apiKey": USER_KEY})
    assert user_set.status_code == 200, user_set.text
    replaced = await api.put(f"{BASE}/user/anthropic", headers=ALICE, json={"apiKey": USER_KEY})
    assert replaced.json()["version"] == 2

    rows = await superuser.fetch("SELECT org_id, user_id, key_enc FROM provider_keys WHERE org_id = $1 "
                                 "ORDER BY user_id NULLS FIRST", ORG_A)
    assert [(row["user_id"]) for row in rows] == [None, "alice"]
    assert all(row["key_enc"].startswith("v1:k1:") for row in rows)
    assert not any(key in row["key_enc"] for row in rows for key in KEYS), "encrypted at rest"

    org_secret = await cluster.get_secret(namespace, secret_name(None, "anthropic"))
    user_secret = await cluster.get_secret(namespace, secret_name("alice", "anthropic"))
    assert secret_values(org_secret) == {"api-key": ORG_KEY}
    assert secret_values(user_secret) == {"api-key": USER_KEY}
    assert user_secret.metadata.labels["agentbox.dev/provider-key"] == "user"

    listed_alice = await api.get(BASE, headers=ALICE)
    assert [(item["scope"], item["provider"]) for item in listed_alice.json()] == [("org", "anthropic"),
                                                                                  ("user", "anthropic")]
    listed_bob = await api.get(BASE, headers=BOB)
    assert [item["scope"] for item in listed_bob.json()] == ["org"], "another user's key is not listed"
    assert (await api.get(BASE, headers=ADMIN_B)).json() == [], "another org's keys are not listed"

    audit = await superuser.fetch("SELECT action, outcome, target, reason, details::text AS details "
                                  "FROM audit_logs WHERE org_id = $1 ORDER BY seq", ORG_A)
    assert [(row["action"], row["outcome"]) for row in audit] == [
        ("provider_key.org.set", "denied"), ("provider_key.org.set", "success"),
        ("provider_key.user.set", "success"), ("provider_key.user.set", "success")]
    assert audit[1]["target"] == "provider_key/org/anthropic"
    said = " ".join([org_set.text, user_set.text, replaced.text, listed_alice.text, caplog.text,
                     json.dumps([dict(row) for row in audit])])
    assert not [key for key in KEYS if key in said]


async def test_a_session_uses_the_users_own_key_else_the_orgs_and_never_holds_it(setup):
    api, cluster, superuser = setup
    namespace = f"tenant-{ORG_A}"
    alice = await api.post("/api/v1/sessions", headers=ALICE,
                           json={"name": "alice-s", "egress": {"allow": ["api.github.com"]}})
    bob = await api.post("/api/v1/sessions", headers=BOB, json={"name": "bob-s"})
    scripted = await api.post("/api/v1/sessions", headers=BOB,
                              json={"name": "bob-scripted", "agent": {"runtime": "scripted"}})
    assert alice.status_code == bob.status_code == scripted.status_code == 201, (alice.text, bob.text)
    alice_cr = await cluster.get_session(namespace, "alice-s")
    bob_cr = await cluster.get_session(namespace, "bob-s")
    assert alice_cr["spec"]["egress"] == {"allow": ["api.github.com"], "providerKey": {
        "name": secret_name("alice", "anthropic"), "key": "api-key"}}
    assert bob_cr["spec"]["egress"]["providerKey"] == {"name": secret_name(None, "anthropic"),
                                                       "key": "api-key"}
    scripted_cr = await cluster.get_session(namespace, "bob-scripted")
    assert "providerKey" not in scripted_cr["spec"].get("egress", {}), "no provider: no key"
    crs = json.dumps([alice_cr, bob_cr, scripted_cr])
    assert not [key for key in KEYS if key in crs], "the CR never holds a key"
    details = await superuser.fetchval("SELECT details::text FROM audit_logs WHERE org_id = $1 AND action = "
                                       "'session.create' AND target = 'session/alice-s'", ORG_A)
    assert secret_name("alice", "anthropic") in details


async def test_plain_text_keys_and_bad_input_are_refused_naming_the_field(setup):
    api, _cluster, superuser = setup
    before = await superuser.fetchval("SELECT count(*) FROM provider_keys")
    in_env = await api.post("/api/v1/sessions", headers=ALICE, json={
        "name": "leaky", "agent": {"env": [{"name": "ANTHROPIC_API_KEY", "value": OTHER_KEY}]}})
    assert in_env.status_code == 422
    assert in_env.headers["content-type"].startswith("application/problem+json")
    assert in_env.json()["errors"][0]["field"].startswith("body.agent.env.0")
    assert "spec.egress.providerKey" in in_env.text and OTHER_KEY not in in_env.text
    key_in_body = await api.post("/api/v1/sessions", headers=ALICE, json={
        "name": "sneaky", "egress": {"providerKey": {"name": secret_name("bob", "anthropic"),
                                                      "key": "api-key"}}})
    assert key_in_body.status_code == 422
    assert key_in_body.json()["errors"][0]["field"] == "body.egress.providerKey"
    spaced = await api.put(f"{BASE}/user/openai", headers=ALICE, json={"apiKey": "has a space"})
    assert spaced.status_code == 422 and spaced.json()["errors"][0]["field"] == "body.apiKey"
    unknown = await api.put(f"{BASE}/user/mistral", headers=ALICE, json={"apiKey": OTHER_KEY})
    assert unknown.status_code == 422 and unknown.json()["errors"][0]["field"] == "path.provider"
    for bad_host in ("https://x.org", "10.0.0.1"):
        host = await api.post("/api/v1/sessions", headers=ALICE, json={"egress": {"allow": [bad_host]}})
        assert host.status_code == 422 and host.json()["errors"][0]["field"] == "body.egress.allow.0"
    assert await superuser.fetchval("SELECT count(*) FROM provider_keys") == before


async def test_deleting_a_key_removes_row_and_secret_and_another_orgs_answer_404(setup):
    api, cluster, superuser = setup
    namespace_b = f"tenant-{ORG_B}"
    set_b = await api.put(f"{BASE}/org/openai", headers=ADMIN_B, json={"apiKey": OTHER_KEY})
    assert set_b.status_code == 200, set_b.text
    assert (await api.delete(f"{BASE}/org/openai", headers=ADMIN_A)).status_code == 404, "org A has none"
    assert await cluster.get_secret(namespace_b, secret_name(None, "openai")) is not None
    async with superuser.transaction():  # row security: org A's context sees none of org B's rows
        await superuser.execute("SET LOCAL ROLE agentbox_app")
        await superuser.execute("SELECT set_config('app.current_org', $1, true)", ORG_A)
        assert await superuser.fetchval("SELECT count(*) FROM provider_keys WHERE org_id = $1", ORG_B) == 0
    assert (await api.delete(f"{BASE}/org/openai", headers=ADMIN_B)).status_code == 204
    assert await cluster.get_secret(namespace_b, secret_name(None, "openai")) is None
    assert await superuser.fetchval("SELECT count(*) FROM provider_keys WHERE org_id = $1", ORG_B) == 0
    assert (await api.delete(f"{BASE}/org/openai", headers=ADMIN_B)).status_code == 404
    # Alice's own key goes; her next session falls back to the org's.
    assert (await api.delete(f"{BASE}/user/anthropic", headers=ALICE)).status_code == 204
    assert await cluster.get_secret(f"tenant-{ORG_A}", secret_name("alice", "anthropic")) is None
    again = await api.post("/api/v1/sessions", headers=ALICE, json={"name": "alice-again"})
    assert again.status_code == 201, again.text
    cr = await cluster.get_session(f"tenant-{ORG_A}", "alice-again")
    assert cr["spec"]["egress"]["providerKey"]["name"] == secret_name(None, "anthropic")


async def test_a_failed_kubernetes_write_takes_the_database_change_back(setup):
    api, _cluster, superuser = setup
    admin = bearer("admin-c", ORG_NO_NAMESPACE, "admin")
    answer = await api.put(f"{BASE}/org/gemini", headers=admin, json={"apiKey": OTHER_KEY})
    assert answer.status_code == 409 and "does not exist" in answer.json()["detail"], answer.text
    stored = await superuser.fetchval("SELECT count(*) FROM provider_keys WHERE org_id = $1",
                                      ORG_NO_NAMESPACE)
    assert stored == 0
    outcome = await superuser.fetchval("SELECT outcome FROM audit_logs WHERE org_id = $1 ORDER BY seq DESC "
                                       "LIMIT 1", ORG_NO_NAMESPACE)
    assert outcome == "failed"
