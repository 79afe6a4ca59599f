"""The chart installed for real: its operator and API run as pods on the real node from the images `make
images` built, `helm test` passes, and a session created through that API runs as a real pod whose demo
tool answers through its gateway container.

PostgreSQL stays the tests' own server on 127.0.0.1: a relay on the real node's bridge address (reachable
from its pods only) leads the API's and the migration Job's connections to it. The test reaches the API
through its Service's cluster IP (kube-proxy serves this host too)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import mint_token
import pytest
from fixtures.cluster import REAL_NODE_PLACEMENT, TEST_NAMESPACE_LABEL
from fixtures.polling import eventually
from fixtures.real_pods import IDENTITY, WORKSPACE_WRITE, restricted_identity, run_python, saying_state

from agentbox.operator.build.pod import SANDBOX_UID
from e2e.stack import ISSUER, REPO, delete_tenant, tools_for

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.realnode, pytest.mark.timeout(1200)]

CHART = REPO / "charts" / "agentbox"
DEMO_TOOLS = {"command": "python", "args": ["-m", "agentbox.sandbox.demo_tools"]}
# hack/real-node.sh's pod network; its bridge, the pods' gateway, is the first address.
POD_CIDR = ipaddress.ip_network(os.environ.get("AGENTBOX_REAL_NODE_POD_CIDR", "10.244.0.0/24"))
# Two Python pods, a migration Job and a test pod on two busy cores.
INSTALL_TIMEOUT = "10m"
START_SECONDS = 240


async def pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65_536):
            target.write(data)
            await target.drain()
    except ConnectionError:
        pass
    finally:
        target.close()


@contextlib.asynccontextmanager
async def relay_to(port: int) -> AsyncIterator[tuple[str, int]]:
    """A listener on the real node's bridge address that leads each connection to 127.0.0.1:port."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    host = str(POD_CIDR[1])
    server = await asyncio.start_server(handle, host, 0)
    try:
        yield host, server.sockets[0].getsockname()[1]
    finally:
        server.close()


def through(dsn: str, host: str, port: int) -> str:
    """The same DSN, at host:port."""
    parts = urlsplit(dsn)
    credentials = parts.netloc.rsplit("@", 1)[0]
    return urlunsplit((parts.scheme, f"{credentials}@{host}:{port}", parts.path, parts.query, ""))


async def helm(kube, *args: str) -> str:
    tools = tools_for(kube)
    return await tools.run(tools.helm, "--kubeconfig", kube.kubeconfig, *args)


def placement_values(prefix: str) -> list[str]:
    return ["--set-json", f"{prefix}.nodeSelector={json.dumps(REAL_NODE_PLACEMENT['nodeSelector'])}",
            "--set-json", f"{prefix}.tolerations={json.dumps(REAL_NODE_PLACEMENT['tolerations'])}"]


async def test_the_chart_runs_on_the_real_node_and_serves_a_real_session(kube, real_node, postgres):
    release = f"abx{secrets.token_hex(3)}"
    namespace = f"{release}-system"
    jwt_secret = secrets.token_urlsafe(48)
    # The chart's pods must pass PSS restricted where it is enforced.
    await kube.kubectl("create", "namespace", namespace)
    await kube.kubectl("label", "namespace", namespace, f"{TEST_NAMESPACE_LABEL}=true",
                       "pod-security.kubernetes.io/enforce=restricted")
    org = f"rn{secrets.token_hex(3)}"
    installed = False
    async with relay_to(urlsplit(postgres.app_dsn).port) as (db_host, db_port):
        try:
            await kube.kubectl(
                "create", "secret", "generic", "database", "-n", namespace,
                f"--from-literal=url={through(postgres.app_dsn, db_host, db_port)}",
                f"--from-literal=migrationsUrl={through(postgres.owner_dsn, db_host, db_port)}")
            await kube.kubectl("create", "secret", "generic", "jwt", "-n", namespace,
                               f"--from-literal=jwt-secret={jwt_secret}")
            async with saying_state(kube, namespace):
                await helm(kube, "install", release, str(CHART), "--namespace", namespace,
                           "--wait", "--timeout", INSTALL_TIMEOUT,
                           "--set", "image.pullPolicy=Never", "--set", f"operator.peeringName={release}",
                           "--set", "operator.replicas=1", "--set", "api.replicas=1",
                           "--set", "podDisruptionBudget.enabled=false",
                           "--set", f"jwt.issuer={ISSUER}", "--set", "jwt.hs256.existingSecret=jwt",
                           "--set", "database.existingSecret=database",
                           *placement_values("operator"), *placement_values("api"),
                           *placement_values("sandbox"))
                installed = True
                tested = await helm(kube, "test", release, "--namespace", namespace, "--timeout", "5m")
            assert "Phase:          Succeeded" in tested, tested

            pods = json.loads(await kube.kubectl("get", "pods", "-n", namespace, "-o", "json"))["items"]
            running = {pod["metadata"]["labels"].get("app.kubernetes.io/component"): pod for pod in pods
                       if pod["status"]["phase"] == "Running"}
            for component in ("operator", "api"):
                pod = running[component]
                assert pod["spec"]["nodeName"] == real_node, pod["spec"]
                facts = await run_python(kube, pod, component, IDENTITY)
                assert facts == restricted_identity(SANDBOX_UID), (component, facts)

            await session_journey(kube, real_node, namespace, release, org, jwt_secret)
        finally:
            with contextlib.suppress(Exception):
                await delete_tenant(kube, f"tenant-{org}")
            if installed:
                with contextlib.suppress(Exception):
                    await helm(kube, "uninstall", release, "--namespace", namespace, "--wait")
            await kube.kubectl("delete", "namespace", namespace, "--ignore-not-found", "--wait=false")


async def session_journey(kube, node: str, namespace: str, release: str, org: str, jwt_secret: str) -> None:
    service = json.loads(await kube.kubectl("get", "service", f"{release}-agentbox-api", "-n", namespace,
                                            "-o", "json"))
    url = f"http://{service['spec']['clusterIP']}:{service['spec']['ports'][0]['port']}"

    def bearer(*, sub: str = "platform", org: str | None = None, role: str | None = None,
               service_role: bool = False) -> dict[str, str]:
        token = mint_token.mint(jwt_secret, issuer=ISSUER, audience="authenticated", sub=sub, org=org,
                                role=role, service_role=service_role, ttl_seconds=900)
        return {"Authorization": f"Bearer {token}"}

    async with httpx.AsyncClient(base_url=url, timeout=30) as api:
        created = await api.post("/api/v1/orgs", headers=bearer(service_role=True),
                                 json={"id": org, "name": f"Org {org}"})
        assert created.status_code == 201, created.text
        tenant = created.json()["namespace"]
        admin = bearer(sub="ada@example.com", org=org, role="admin")
        demo = await api.post("/api/v1/mcp/configurations", headers=admin,
                              json={"name": "demo", "transport": "stdio", "stdio": DEMO_TOOLS})
        assert demo.status_code == 201, demo.text
        created = await api.post("/api/v1/sessions", headers=admin, json={
            "name": "real", "agent": {"runtime": "scripted"}, "mcpServers": [{"name": "demo"}]})
        assert created.status_code == 201, created.text

        async def ready():
            view = (await api.get("/api/v1/sessions/real", headers=admin)).json()
            return view if view.get("ready") else None
        async with saying_state(kube, tenant):
            await eventually(ready, timeout=START_SECONDS, interval=1, what="session real Ready")

        session = json.loads(await kube.kubectl("get", "agentsession", "real", "-n", tenant, "-o", "json"))
        pod = json.loads(await kube.kubectl("get", "pod", session["status"]["podName"], "-n", tenant,
                                            "-o", "json"))
        assert pod["spec"]["nodeName"] == node, pod["spec"]
        for container in ("runner", "gateway"):
            facts = await run_python(kube, pod, container, IDENTITY)
            assert facts == restricted_identity(SANDBOX_UID), (container, facts)
        written = await run_python(kube, pod, "runner", WORKSPACE_WRITE)
        assert written == {"owner": SANDBOX_UID, "content": "kept"}

        # The API pod reaches the runner through the session's Service; the scripted agent calls the demo
        # tool through the gateway container.
        content = 'tool demo_shout {"text": "from the chart"}'
        sent = await api.post("/api/v1/sessions/real/message", headers=admin, json={"content": content})
        assert sent.status_code == 200, sent.text

        async def answered():  # the reply is complete once the agent is stable again
            status = (await api.get("/api/v1/sessions/real/status", headers=admin)).json()
            messages = (await api.get("/api/v1/sessions/real/messages", headers=admin)).json()["messages"]
            asked = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"] == content]
            replies = [m for m in messages[asked[-1] + 1:] if m["role"] == "agent"] if asked else []
            return replies if replies and status.get("status") == "stable" else None
        async with saying_state(kube, tenant):
            replies = await eventually(answered, timeout=120, interval=1, what="the agent's answer")
        assert replies[-1]["content"] == "FROM THE CHART", replies
