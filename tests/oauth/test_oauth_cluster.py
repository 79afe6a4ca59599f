"""The Kubernetes side of OAuth on the real local cluster: the access token lands in the Secret the
MCPServer names (never a ConfigMap or the spec), invalid_grant shows on the MCPServer, revoke removes it."""

from __future__ import annotations

import base64
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
            configuration_id: uuid.UUID = await superuser.fetchval(
                "INSERT INTO mcp_configurations (org_id, name, transport, url, auth_type) "
                "VALUES ($1, 'tracker', 'streamable-http', $2, 'oauth') RETURNING id", org, server.resource)
            # The MCPServer as the configuration sync renders it; its Secret does not exist yet.
            await cluster.apply_mcp_server(namespace, "tracker", {
                "transport": "streamable-http", "url": server.resource,
                "auth": {"type": "oauth", "secretRef": {"name": "tracker", "key": "token"}}}, {}, {})
            shared = Services(settings=Settings(encryption_keys=[generate_key_entry("k1")],
                                                tenant_namespace_prefix="t-"),
                              database=database, kube=cluster,
                              verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                                     hs256_secret=HS256_SECRET))
            app = create_app(services_override=shared)
            transport = httpx.ASGITransport(app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as api:
                init = await api.post("/api/v1/mcp/oauth/init", headers=headers,
                                      json={"configurationId": str(configuration_id)})
                assert init.status_code == 200, init.text
                async with httpx.AsyncClient() as browser:
                    consent = await browser.get(init.json()["authorizationUrl"])
                callback = await api.get(consent.headers["location"])
                assert callback.status_code == 200 and callback.json()["outcome"] == "connected"
                access = next(iter(server.access_tokens))

                core = client.CoreV1Api(api_client)
                secret = await core.read_namespaced_secret("tracker", namespace)
                assert base64.b64decode(secret.data["token"]).decode() == access
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

                revoked = await api.post("/api/v1/mcp/oauth/revoke", headers=headers,
                                         json={"configurationId": str(configuration_id)})
                assert revoked.status_code == 200, revoked.text
                secret = await core.read_namespaced_secret("tracker", namespace)
                assert "token" not in (secret.data or {})
                query = parse_qs(urlsplit(init.json()["authorizationUrl"]).query)
                assert query["resource"] == [server.resource]
            http = shared.extras.get("oauth_http")
            if http is not None:
                await http.aclose()
    finally:
        await api_client.close()
        await database.close()
        await superuser.close()
