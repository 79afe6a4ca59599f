"""MCP configurations over HTTP against the real PostgreSQL and cluster; connection tests against real
FastMCP servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import socket
import uuid

import asyncpg
import httpx
import pytest_asyncio
from fastmcp import FastMCP
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
from kubernetes_asyncio import client

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.crypto import generate_key_entry
from agentbox.api.db import Database
from agentbox.api.kube import Kube as ApiKube
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

SUFFIX = secrets.token_hex(3)
ORG_A, ORG_B, ORG_NO_NAMESPACE = f"mcpa{SUFFIX}", f"mcpb{SUFFIX}", f"mcpc{SUFFIX}"
TOKEN = "ghp_" + secrets.token_hex(18)
HEADER_SECRET = "hdr-" + secrets.token_hex(12)
ENV_SECRET = "env-" + secrets.token_hex(12)
UPSTREAM_TOKEN = "upstream-" + secrets.token_hex(12)
SECRETS = (TOKEN, HEADER_SECRET, ENV_SECRET, UPSTREAM_TOKEN)
BASE = "/api/v1/mcp/configurations"


def bearer(sub: str, org: str, role: str = "user") -> dict[str, str]:
    return {"Authorization": f"Bearer {hs256(sub=sub, app_metadata={'org_id': org, 'role': role})}"}


ADMIN_A, USER_A = bearer("admin-a", ORG_A, "admin"), bearer("user-a", ORG_A)
ADMIN_B, ADMIN_C = bearer("admin-b", ORG_B, "admin"), bearer("admin-c", ORG_NO_NAMESPACE, "admin")


def serve_mcp(server: FastMCP, transport: str = "http"):
    """A FastMCP server on 127.0.0.1 (lifespan on: its session manager needs it)."""
    return serve(server.http_app(transport=transport), lifespan="on")


def upstream(auth: StaticTokenVerifier | None = None) -> FastMCP:
    server = FastMCP("upstream", auth=auth)

    @server.tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    @server.tool
    def echo(text: str) -> str:
        """Say it back."""
        return text

    return server


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
    settings = Settings(encryption_keys=[generate_key_entry("k1")], mcp_test_timeout_seconds=3,
                        mcp_test_allow_private_networks=True)  # the test servers listen on loopback
    services = Services(settings=settings, database=database, kube=cluster,
                        verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                               hs256_secret=HS256_SECRET))
    app = create_app(services_override=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test") as api:
        yield api, cluster, superuser
    for org in (ORG_A, ORG_B):
        await kube.kubectl("delete", "namespace", f"tenant-{org}", "--ignore-not-found", "--wait=false")
    await api_client.close()
    await database.close()
    await superuser.close()


async def audit_rows(superuser, org: str) -> list[tuple[str, str]]:
    rows = await superuser.fetch("SELECT action, outcome FROM audit_logs WHERE org_id = $1 ORDER BY seq", org)
    return [tuple(row) for row in rows]


async def namespace_text(cluster: ApiKube, namespace: str) -> str:
    """Everything readable in the namespace except Secrets: MCPServers and ConfigMaps."""
    servers = await cluster.custom.list_namespaced_custom_object("agentbox.dev", "v1alpha1", namespace,
                                                                 "mcpservers")
    config_maps = await cluster.core.list_namespaced_config_map(namespace)
    return json.dumps(servers) + json.dumps([item.data for item in config_maps.items])


def secret_values(secret: client.V1Secret) -> dict[str, str]:
    return {key: base64.b64decode(value).decode() for key, value in (secret.data or {}).items()}


GITHUB = {"name": "github", "transport": "streamable-http", "url": "https://mcp.example.com/mcp",
          "authType": "bearer", "bearerToken": TOKEN, "headers": [{"name": "X-Plain", "value": "visible"}],
          "secretHeaders": {"X-Api-Key": HEADER_SECRET}, "tools": {"allow": [], "deny": ["delete_repo"]},
          "timeout": "20s"}
FILES = {"name": "files", "transport": "stdio", "stdio": {"command": "npx", "args": ["-y", "files"]},
         "stdioEnv": {"FILES_KEY": ENV_SECRET}}


async def test_crud_keeps_credentials_in_the_secret_only(setup, caplog):
    api, cluster, superuser = setup
    caplog.set_level(logging.DEBUG)
    namespace = f"tenant-{ORG_A}"
    assert (await api.post(BASE, headers=USER_A, json=GITHUB)).status_code == 403
    created = await api.post(BASE, headers=ADMIN_A, json=GITHUB)
    assert created.status_code == 201, created.text
    view = created.json()
    assert view["credentials"] == {"bearerToken": True, "secretHeaders": True, "stdioEnv": False}
    assert view["headers"] == [{"name": "X-Plain", "value": "visible"}] and view["timeout"] == "20s"
    config_id = view["id"]

    server = await cluster.get_mcp_server(namespace, "github")
    assert server["spec"]["auth"] == {"type": "bearer", "secretRef": {"name": "github", "key": "token"}}
    assert server["metadata"]["labels"]["agentbox.dev/mcp-configuration"] == config_id
    assert secret_values(await cluster.get_secret(namespace, "github")) == {
        "token": TOKEN, "header-x-api-key": HEADER_SECRET}

    stdio = await api.post(BASE, headers=ADMIN_A, json=FILES)
    assert stdio.status_code == 201, stdio.text
    assert secret_values(await cluster.get_secret(namespace, "files")) == {"env-FILES_KEY": ENV_SECRET}

    listed = await api.get(BASE, headers=USER_A)
    assert [item["name"] for item in listed.json()] == ["files", "github"]
    assert (await api.get(f"{BASE}/{config_id}", headers=USER_A)).json()["name"] == "github"
    stored = await superuser.fetchrow("SELECT bearer_token_enc, secret_headers_enc FROM mcp_configurations "
                                      "WHERE id = $1", uuid.UUID(config_id))
    assert all(value.startswith("v1:k1:") for value in stored.values())

    # PUT: a credential left out is kept, null removes it.
    update = {key: value for key, value in GITHUB.items() if key != "bearerToken"}
    update.update(secretHeaders=None, description="updated")
    updated = await api.put(f"{BASE}/{config_id}", headers=ADMIN_A, json=update)
    assert updated.status_code == 200, updated.text
    assert updated.json()["credentials"] == {"bearerToken": True, "secretHeaders": False, "stdioEnv": False}
    assert updated.json()["version"] == 2
    assert secret_values(await cluster.get_secret(namespace, "github")) == {"token": TOKEN}
    assert (await cluster.get_mcp_server(namespace, "github"))["spec"]["description"] == "updated"
    renamed = await api.put(f"{BASE}/{config_id}", headers=ADMIN_A, json={**update, "name": "other"})
    assert renamed.status_code == 422 and renamed.json()["errors"][0]["field"] == "body.name"

    everything_said = " ".join([created.text, stdio.text, listed.text, updated.text, caplog.text,
                                await namespace_text(cluster, namespace),
                                json.dumps([dict(r) for r in await superuser.fetch(
                                    "SELECT target, reason, details::text FROM audit_logs")])])
    assert not [secret for secret in SECRETS if secret in everything_said]

    assert (await api.delete(f"{BASE}/{config_id}", headers=USER_A)).status_code == 403
    assert (await api.delete(f"{BASE}/{config_id}", headers=ADMIN_A)).status_code == 204
    assert await cluster.get_mcp_server(namespace, "github") is None
    assert await cluster.get_secret(namespace, "github") is None
    assert (await api.get(f"{BASE}/{config_id}", headers=ADMIN_A)).status_code == 404
    assert await audit_rows(superuser, ORG_A) == [
        ("mcp.configuration.create", "denied"), ("mcp.configuration.create", "success"),
        ("mcp.configuration.create", "success"), ("mcp.configuration.update", "success"),
        ("mcp.configuration.update", "failed"), ("mcp.configuration.delete", "denied"),
        ("mcp.configuration.delete", "success")]


async def test_bad_bodies_name_the_field_and_change_nothing(setup):
    api, cluster, superuser = setup
    before = await superuser.fetchval("SELECT count(*) FROM mcp_configurations")
    cases = [
        ({**GITHUB, "name": "../etc"}, "body.name"),
        ({**GITHUB, "transport": "carrier-pigeon"}, "body.transport"),
        ({**GITHUB, "url": None}, "body.url"),
        ({**GITHUB, "bearerToken": None}, "body.bearerToken"),
        ({**GITHUB, "timeout": "1500ms"}, "body.timeout"),
        ({**GITHUB, "surprise": 1}, "body.surprise"),
        ({**GITHUB, "secretHeaders": {"Bad Name": "x"}}, "body.secretHeaders"),
        ({**FILES, "url": "https://x.example"}, "body.url"),
        ({**FILES, "stdioEnv": {"1BAD": "x"}}, "body.stdioEnv"),
    ]
    for body, field in cases:
        response = await api.post(BASE, headers=ADMIN_A, json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert any(error["field"].startswith(field) for error in response.json()["errors"]), response.text
        assert TOKEN not in response.text
    assert await superuser.fetchval("SELECT count(*) FROM mcp_configurations") == before
    assert await cluster.get_mcp_server(f"tenant-{ORG_A}", "github") is None


async def test_another_orgs_ids_answer_404_change_nothing_and_are_audited(setup):
    api, cluster, superuser = setup
    created = await api.post(BASE, headers=ADMIN_A, json={**GITHUB, "name": "probe-target"})
    assert created.status_code == 201, created.text
    config_id = created.json()["id"]
    before_b = len(await audit_rows(superuser, ORG_B))
    probes = [("GET", f"{BASE}/{config_id}", None),
              ("PUT", f"{BASE}/{config_id}", {**GITHUB, "name": "probe-target"}),
              ("DELETE", f"{BASE}/{config_id}", None),
              ("POST", "/api/v1/mcp/test", {"configurationId": config_id})]
    for method, path, body in probes:
        response = await api.request(method, path, headers=ADMIN_B, json=body)
        assert response.status_code == 404, (method, path, response.text)
        assert config_id in response.json()["detail"]
    assert [item["name"] for item in (await api.get(BASE, headers=ADMIN_B)).json()] == []
    assert (await audit_rows(superuser, ORG_B))[before_b:] == [
        ("mcp.configuration.update", "denied"), ("mcp.configuration.delete", "denied"),
        ("mcp.test", "denied")]
    after = await api.get(f"{BASE}/{config_id}", headers=ADMIN_A)
    assert after.json()["version"] == 1 and after.json()["updatedAt"] == created.json()["updatedAt"]
    assert await cluster.get_mcp_server(f"tenant-{ORG_A}", "probe-target") is not None


async def test_a_failed_kubernetes_write_takes_the_database_change_back(setup):
    api, cluster, superuser = setup
    # No tenant namespace for this org: the Secret write fails after the row was inserted.
    refused = await api.post(BASE, headers=ADMIN_C, json=GITHUB)
    assert refused.status_code == 409 and "does not exist" in refused.json()["detail"], refused.text
    assert await superuser.fetchval("SELECT count(*) FROM mcp_configurations WHERE org_id = $1",
                                    ORG_NO_NAMESPACE) == 0
    assert await audit_rows(superuser, ORG_NO_NAMESPACE) == [("mcp.configuration.create", "failed")]

    # A Secret of the configuration's name that someone else owns: the update is refused as a whole.
    namespace = f"tenant-{ORG_A}"
    created = await api.post(BASE, headers=ADMIN_A, json={**GITHUB, "name": "contested"})
    config_id = created.json()["id"]
    await cluster.core.patch_namespaced_secret("contested", namespace, {
        "metadata": {"labels": {"agentbox.dev/mcp-configuration": "someone-else"}}})
    conflict = await api.put(f"{BASE}/{config_id}", headers=ADMIN_A,
                             json={**GITHUB, "name": "contested", "bearerToken": "new-token-value"})
    assert conflict.status_code == 409, conflict.text
    after = (await api.get(f"{BASE}/{config_id}", headers=ADMIN_A)).json()
    assert after["version"] == 1
    assert secret_values(await cluster.get_secret(namespace, "contested"))["token"] == TOKEN
    assert (await audit_rows(superuser, ORG_A))[-1] == ("mcp.configuration.update", "failed")

    # A name taken by an object that is not ours: no row, and the foreign object is left alone.
    taken = await api.post(BASE, headers=ADMIN_A, json={**GITHUB, "name": "contested"})
    assert taken.status_code == 409  # the unique name in the database
    handmade = {"apiVersion": "agentbox.dev/v1alpha1", "kind": "MCPServer", "metadata": {"name": "handmade"},
                "spec": {"transport": "sse", "url": "https://handmade.example/sse"}}
    await cluster.custom.create_namespaced_custom_object("agentbox.dev", "v1alpha1", namespace, "mcpservers",
                                                         handmade)
    clash = await api.post(BASE, headers=ADMIN_A, json={**GITHUB, "name": "handmade"})
    assert clash.status_code == 409 and "does not belong" in clash.json()["detail"]
    left_alone = await cluster.get_mcp_server(namespace, "handmade")
    assert left_alone["spec"]["url"] == handmade["spec"]["url"]
    assert "agentbox.dev/mcp-configuration" not in left_alone["metadata"].get("labels", {})
    assert await cluster.get_secret(namespace, "handmade") is None
    assert await superuser.fetchval("SELECT count(*) FROM mcp_configurations WHERE name = 'handmade'") == 0


async def test_connection_test_lists_tools_with_and_without_a_token(setup, caplog):
    api, _, superuser = setup
    caplog.set_level(logging.DEBUG)
    async with serve_mcp(upstream()) as open_url, serve_mcp(upstream(StaticTokenVerifier(
            tokens={UPSTREAM_TOKEN: {"client_id": "agentbox", "scopes": []}}))) as guarded_url, \
            serve_mcp(upstream(), transport="sse") as sse_url:
        found = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                               json={"transport": "streamable-http", "url": f"{open_url}/mcp"})
        assert found.status_code == 200, found.text
        assert sorted(tool["name"] for tool in found.json()["tools"]) == ["add", "echo"]
        sse = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                             json={"transport": "sse", "url": f"{sse_url}/sse"})
        assert sse.status_code == 200 and len(sse.json()["tools"]) == 2, sse.text

        unauthorised = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                                      json={"transport": "streamable-http", "url": f"{guarded_url}/mcp"})
        assert unauthorised.status_code == 502, unauthorised.text
        assert unauthorised.headers["content-type"] == "application/problem+json"
        authorised = await api.post("/api/v1/mcp/test", headers=ADMIN_A, json={
            "transport": "streamable-http", "url": f"{guarded_url}/mcp", "bearerToken": UPSTREAM_TOKEN})
        assert authorised.status_code == 200 and len(authorised.json()["tools"]) == 2, authorised.text
        assert UPSTREAM_TOKEN not in authorised.text

        saved = await api.post(BASE, headers=ADMIN_A, json={
            "name": "guarded", "transport": "streamable-http", "url": f"{guarded_url}/mcp",
            "authType": "bearer", "bearerToken": UPSTREAM_TOKEN})
        assert saved.status_code == 201, saved.text
        by_id = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                               json={"configurationId": saved.json()["id"]})
        assert by_id.status_code == 200 and len(by_id.json()["tools"]) == 2, by_id.text
        assert (await api.post("/api/v1/mcp/test", headers=USER_A,
                               json={"configurationId": saved.json()["id"]})).status_code == 403
    rows = await superuser.fetch("SELECT outcome, details::text AS details FROM audit_logs "
                                 "WHERE org_id = $1 AND action = 'mcp.test' ORDER BY seq", ORG_A)
    assert [row["outcome"] for row in rows] == [
        "success", "success", "failed", "success", "success", "denied"]
    assert not any(UPSTREAM_TOKEN in row["details"] for row in rows)
    assert UPSTREAM_TOKEN not in caplog.text


async def test_connection_test_failures_are_problems_not_500s(setup):
    api, _, _ = setup
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        down_port = closed.getsockname()[1]
    down = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                          json={"transport": "streamable-http", "url": f"http://127.0.0.1:{down_port}/mcp"})
    assert down.status_code == 502, down.text

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, never answers, until the caller gives up and hangs up
        writer.close()

    hanging = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = hanging.sockets[0].getsockname()[1]
    try:
        slow = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                              json={"transport": "streamable-http", "url": f"http://127.0.0.1:{port}/mcp",
                                    "timeout": "1s"})
    finally:
        hanging.close()
    assert slow.status_code == 504 and "1s" in slow.json()["detail"], slow.text

    stdio = await api.post("/api/v1/mcp/test", headers=ADMIN_A, json={"transport": "stdio"})
    assert stdio.status_code == 422 and stdio.json()["errors"][0]["field"] == "body.transport", stdio.text
    metadata = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                              json={"transport": "sse", "url": "http://169.254.169.254/sse"})
    assert metadata.status_code == 422 and "link-local" in metadata.json()["detail"]
    both = await api.post("/api/v1/mcp/test", headers=ADMIN_A,
                          json={"configurationId": str(uuid.uuid4()), "transport": "sse"})
    assert both.status_code == 422


async def test_the_mcpservers_status_shows_in_the_configuration(setup):
    api, cluster, _ = setup
    created = await api.post(BASE, headers=ADMIN_A, json={**GITHUB, "name": "status-probe"})
    assert created.status_code == 201 and created.json()["status"] == "pending", created.text
    config_id = created.json()["id"]
    namespace = f"tenant-{ORG_A}"
    server = await cluster.get_mcp_server(namespace, "status-probe")
    for phase, message in (("Unreachable", "connection refused"), ("Ready", "")):
        await cluster.custom.patch_namespaced_custom_object_status(  # what the operator's probe writes
            "agentbox.dev", "v1alpha1", namespace, "mcpservers", "status-probe",
            {"status": {"phase": phase, "observedGeneration": server["metadata"]["generation"],
                        "conditions": [
                {"type": "Ready", "status": "True" if phase == "Ready" else "False", "reason": phase,
                 "message": message, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
            _content_type="application/merge-patch+json")
        one = (await api.get(f"{BASE}/{config_id}", headers=USER_A)).json()
        listed = next(item for item in (await api.get(BASE, headers=USER_A)).json()
                      if item["id"] == config_id)
        assert (one["status"], one["statusMessage"]) == (phase.lower(), message or None)
        assert listed["status"] == one["status"]


async def test_reserved_names_and_unsafe_values_in_headers_are_refused_and_change_nothing(setup):
    api, cluster, superuser = setup
    created = await api.post(BASE, headers=ADMIN_A, json={**GITHUB, "name": "header-rules"})
    assert created.status_code == 201, created.text
    config_id, namespace = created.json()["id"], f"tenant-{ORG_A}"
    before = await superuser.fetchrow("SELECT * FROM mcp_configurations WHERE id = $1", uuid.UUID(config_id))
    server_before = await cluster.get_mcp_server(namespace, "header-rules")
    cases = [
        ({"headers": [{"name": "Host", "value": "metadata.internal"}]}, "body.headers.0.name"),
        ({"headers": [{"name": "X-Plain", "value": "a\r\nX-Injected: 1"}]}, "body.headers.0.value"),
        ({"secretHeaders": {"Transfer-Encoding": "chunked"}}, "body.secretHeaders.Transfer-Encoding"),
        ({"secretHeaders": {"X-Api-Key": "key\nX-Injected: 1"}}, "body.secretHeaders.X-Api-Key"),
    ]
    for change, field in cases:
        for method, path in (("POST", BASE), ("PUT", f"{BASE}/{config_id}")):
            name = "header-rules" if method == "PUT" else "header-rules-new"
            response = await api.request(method, path, headers=ADMIN_A,
                                         json={**GITHUB, "name": name, **change})
            assert response.status_code == 422, (method, change, response.text)
            assert response.headers["content-type"] == "application/problem+json"
            assert response.json()["errors"][0]["field"].startswith(field), response.text
    assert await superuser.fetchrow("SELECT * FROM mcp_configurations WHERE id = $1",
                                    uuid.UUID(config_id)) == before
    assert await cluster.get_mcp_server(namespace, "header-rules-new") is None
    after = await cluster.get_mcp_server(namespace, "header-rules")
    assert after["spec"] == server_before["spec"]


async def test_the_apiserver_refuses_mcpservers_with_reserved_or_unsafe_headers(setup):
    _, cluster, _ = setup
    namespace = f"tenant-{ORG_A}"

    async def create(name: str, header: dict) -> None:
        await cluster.custom.create_namespaced_custom_object("agentbox.dev", "v1alpha1", namespace,
                                                             "mcpservers", {
            "apiVersion": "agentbox.dev/v1alpha1", "kind": "MCPServer", "metadata": {"name": name},
            "spec": {"transport": "sse", "url": "https://mcp.example.com/sse", "headers": [header]}})

    for header, message in [({"name": "Host", "value": "metadata.internal"}, "is reserved"),
                            ({"name": "proxy-authorization", "value": "Basic eA=="}, "is reserved"),
                            ({"name": "TRANSFER-ENCODING", "value": "chunked"}, "is reserved"),
                            ({"name": "X-Plain", "value": "a\r\nX-Injected: 1"}, "should match"),
                            ({"name": "X-Plain", "value": "bell\u0007"}, "should match")]:
        try:
            await create("refused-headers", header)
        except client.ApiException as error:
            assert error.status == 422 and message in json.loads(error.body)["message"], error.body
        else:
            raise AssertionError(f"the apiserver admitted {header}")
    await create("ordinary-headers", {"name": "Cookie", "value": "session=abc; theme=dark\tx"})
    admitted = await cluster.get_mcp_server(namespace, "ordinary-headers")
    assert admitted["spec"]["headers"][0]["name"] == "Cookie"


async def test_a_row_stored_before_the_header_rules_still_reads_but_is_not_sent(setup):
    api, _, superuser = setup
    config_id = await superuser.fetchval(
        "INSERT INTO mcp_configurations (org_id, name, transport, url, headers) "
        "VALUES ($1, 'legacy-headers', 'streamable-http', 'http://127.0.0.1:9/mcp', $2::jsonb) RETURNING id",
        ORG_A, json.dumps([{"name": "Host", "value": "metadata.internal"}]))
    read = await api.get(f"{BASE}/{config_id}", headers=USER_A)
    assert read.status_code == 200, read.text
    assert read.json()["headers"] == [{"name": "Host", "value": "metadata.internal"}]
    tested = await api.post("/api/v1/mcp/test", headers=ADMIN_A, json={"configurationId": str(config_id)})
    assert tested.status_code == 422, tested.text
    assert tested.json()["errors"][0]["field"] == "body.configurationId"
    assert "headers.0.name" in tested.json()["detail"] and "reserved" in tested.json()["detail"]
