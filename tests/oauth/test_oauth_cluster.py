"""The Kubernetes side of OAuth on the real local cluster: the access token lands in the Secret the
MCPServer names (never a ConfigMap or the spec) beside the configuration's other credentials, editing the
configuration keeps it there, invalid_grant shows on the MCPServer (and survives an edit), revoke removes
only the token."""

from __future__ import annotations

import base64
import secrets
import uuid
from urllib.parse import parse_qs, urlsplit

import asyncpg
import httpx
from kubernetes_asyncio import client

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.crypto import generate_key_entry
from agentbox.api.db import Database
from agentbox.api.kube import Kube as ApiKube
from agentbox.api.settings import Settings

from .authserver import AuthServer
from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

CONFIGURATIONS = "/api/v1/mcp/configurations"
TEAM_SECRET = "team-" + secrets.token_hex(8)
TRACKER = {"name": "tracker", "transport": "streamable-http", "authType": "oauth",
           "secretHeaders": {"X-Team": TEAM_SECRET}}


async def secret_values(core: client.CoreV1Api, namespace: str) -> dict[str, str]:
    secret = await core.read_namespaced_secret("tracker", namespace)
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


async def test_tokens_reach_only_the_secret_and_reauth_shows_on_the_mcpserver(postgres, kube, namespace):
    org = namespace.removeprefix("t-")
    token = hs256(sub="admin-1", app_metadata={"org_id": org, "role": "admin"})
    headers = {"Authorization": f"Bearer {token}"}
    superuser = await asyncpg.connect(postgres.superuser_dsn)
    database = Database(postgres.app_dsn)
    api_client = client.ApiClient(configuration=kube._configuration)
    cluster = ApiKube(api_client)
    server = AuthServer()
    try:
        async with serve(server.app()) as base:
            server.base_url = base
            await superuser.execute("INSERT INTO organizations (id, name) VALUES ($1, 'Org')", org)
            shared = Services(settings=Settings(encryption_keys=[generate_key_entry("k1")],
                                                tenant_namespace_prefix="t-",
                                                mcp_test_allow_private_networks=True),  # loopback provider
                              database=database, kube=cluster,
                              verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                                     hs256_secret=HS256_SECRET))
            app = create_app(services_override=shared)
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as api:
                tracker = TRACKER | {"url": server.resource}
                created = await api.post(CONFIGURATIONS, headers=headers, json=tracker)
                assert created.status_code == 201, created.text
                configuration_id = uuid.UUID(created.json()["id"])
                init = await api.post("/api/v1/mcp/oauth/init", headers=headers,
                                      json={"configurationId": str(configuration_id)})
                assert init.status_code == 200, init.text
                async with httpx.AsyncClient() as browser:
                    consent = await browser.get(init.json()["authorizationUrl"])
                callback = await api.get(consent.headers["location"])
                assert callback.status_code == 200 and callback.json()["outcome"] == "connected"
                access = next(iter(server.access_tokens))

                core = client.CoreV1Api(api_client)
                assert await secret_values(core, namespace) == {"token": access, "header-x-team": TEAM_SECRET}

                # Editing the configuration renders the Secret again: the access token stays in it.
                edited = await api.put(f"{CONFIGURATIONS}/{configuration_id}", headers=headers,
                                       json=tracker | {"description": "edited"})
                assert edited.status_code == 200, edited.text
                assert await secret_values(core, namespace) == {"token": access, "header-x-team": TEAM_SECRET}
                configmaps = await core.list_namespaced_config_map(namespace)
                assert all(access not in str(item.data) for item in configmaps.items)
                resource = await cluster.get_mcp_server(namespace, "tracker")
                assert access not in str(resource)
                assert {"type": "Authorized", "status": "True"}.items() <= {
                    **resource["status"]["conditions"][0]}.items()

                server.refresh_tokens.clear()
                refused = await api.post("/api/v1/mcp/oauth/refresh", headers=headers,
                                         json={"configurationId": str(configuration_id), "force": True})
                assert refused.status_code == 409
                resource = await cluster.get_mcp_server(namespace, "tracker")
                assert resource["metadata"]["annotations"]["agentbox.dev/oauth"] == "needs-reauth"
                authorized = next(c for c in resource["status"]["conditions"] if c["type"] == "Authorized")
                assert (authorized["status"], authorized["reason"]) == ("False", "NeedsReauthorization")
                edited = await api.put(f"{CONFIGURATIONS}/{configuration_id}", headers=headers,
                                       json=tracker | {"description": "again"})
                assert edited.status_code == 200, edited.text
                resource = await cluster.get_mcp_server(namespace, "tracker")
                assert resource["spec"]["description"] == "again"
                assert resource["metadata"]["annotations"]["agentbox.dev/oauth"] == "needs-reauth"

                revoked = await api.post("/api/v1/mcp/oauth/revoke", headers=headers,
                                         json={"configurationId": str(configuration_id)})
                assert revoked.status_code == 200, revoked.text
                assert await secret_values(core, namespace) == {"header-x-team": TEAM_SECRET}
                query = parse_qs(urlsplit(init.json()["authorizationUrl"]).query)
                assert query["resource"] == [server.resource]
            http = shared.extras.get("oauth_http")
            if http is not None:
                await http.aclose()
    finally:
        await api_client.close()
        await database.close()
        await superuser.close()
