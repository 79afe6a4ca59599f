"""Onboarding an org under the chart's API identity, against the real cluster and database.

The chart grants the API nothing in a tenant namespace until the operator binds its tenant role there (a
RoleBinding in the namespace's baseline), a moment after the API created the namespace. POST
/api/v1/orgs waits for that; with no operator running it answers 503, keeps no org row and leaves the
namespace (the API may delete none), which the next attempt takes over.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest
import pytest_asyncio
from api.conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256
from e2e.stack import chart_identity, delete_tenant, operator_process, tools_for
from kubernetes_asyncio import client, config

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.kube import Kube as ApiKube
from agentbox.api.routers import orgs
from agentbox.api.settings import Settings

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]

RELEASE = "abx-org"
SYSTEM_NAMESPACE = "abx-org-system"
PLATFORM = {"Authorization": f"Bearer {hs256(sub='platform', role='service_role', app_metadata=None)}"}


@dataclass
class Onboarding:
    api: httpx.AsyncClient
    kube: ApiKube  # the API's own client, as the chart's API ServiceAccount
    operator_kubeconfig: Path
    operator_env: dict[str, str]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def onboarding(kube, postgres, tmp_path_factory) -> AsyncIterator[Onboarding]:
    tools = tools_for(kube)
    identities = await chart_identity.write_identities(tools, RELEASE, SYSTEM_NAMESPACE,
                                                       tmp_path_factory.mktemp("identity"), duration="1h")
    operator = await chart_identity.render_operator(tools, RELEASE, SYSTEM_NAMESPACE)
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(identities["api"]), client_configuration=configuration)
    database = Database(postgres.app_dsn)
    async with client.ApiClient(configuration) as api_client:
        cluster = ApiKube(api_client)
        services = Services(settings=Settings(), database=database, kube=cluster,
                            verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                                   hs256_secret=HS256_SECRET))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(services_override=services)),
                                     base_url="http://api.test") as api:
            yield Onboarding(api, cluster, identities["operator"], operator.env)
    await database.close()


async def test_an_org_waits_until_the_operator_lets_the_api_into_its_namespace(kube, postgres, onboarding,
                                                                             monkeypatch, tmp_path):
    org = f"onb{secrets.token_hex(3)}"
    namespace = f"tenant-{org}"
    monkeypatch.setattr(orgs, "TENANT_ACCESS_WAIT_SECONDS", 2)
    try:
        refused = await onboarding.api.post("/api/v1/orgs", headers=PLATFORM, json={"id": org, "name": "O"})
        assert refused.status_code == 503, refused.text
        assert refused.headers["content-type"] == "application/problem+json"
        assert namespace in refused.json()["detail"] and "operator" in refused.json()["detail"]
        assert refused.headers["retry-after"]
        superuser = await asyncpg.connect(postgres.superuser_dsn)
        try:
            assert await superuser.fetchval("SELECT count(*) FROM organizations WHERE id = $1", org) == 0
        finally:
            await superuser.close()
        label = await kube.kubectl("get", "namespace", namespace, "-o",
                                   "jsonpath={.metadata.labels.agentbox\\.dev/tenant}")
        assert label == org  # left behind for the next attempt

        async with operator_process(onboarding.operator_kubeconfig, namespace, tmp_path / "operator.log",
                                    onboarding.operator_env) as operator:
            started = time.monotonic()
            created = await onboarding.api.post("/api/v1/orgs", headers=PLATFORM,
                                                json={"id": org, "name": "O"})
            assert created.status_code == 201, f"{created.text}\n{operator.tail()}"
            print(f"org created {time.monotonic() - started:.2f} s after the operator started")
            # Its credentials can be written at once.
            await onboarding.kube.apply_secret(namespace, "tools", {"token": "t"},
                                                   {"agentbox.dev/mcp-configuration": "c1"})
            assert await onboarding.kube.get_secret(namespace, "tools") is not None
    finally:
        await delete_tenant(kube, namespace)
