"""The frontend's journey on the real cluster and database, with the operator and the API running.

Every step goes through the API's HTTP surface as a frontend would; the cluster is only read to show
what the steps did. On kwok the session's pod is stood in for by the real runner and gateway started
locally (hack/session_runners.py) and kwok forwards the pod's port to them, so a message takes the API's
real path: token, Secret, port-forward through the Kubernetes API, runner, agent, tool.

Nothing in a session's pod reaches back to this host (a real pod on kind cannot, and its NetworkPolicy
refuses private addresses): the agent's tool is a stdio server the gateway starts beside itself
(agentbox.sandbox.demo_tools). The MCP server these tests serve on 127.0.0.1 is met only by what runs on
the host in both kinds: the operator's probe.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from api.conftest import serve
from fastmcp import FastMCP
from fastmcp.server.auth.providers.jwt import StaticTokenVerifier
from fixtures import polling

from e2e.stack import Stack, delete_tenant, free_port, running_stack

pytestmark = pytest.mark.e2e

TENANT_PREFIX = "tenant-e2e"
UPSTREAM_TOKEN = "upstream-secret-token"
# The same command on both cluster kinds: the image's python, or the stand-in gateway's (first on its PATH).
DEMO_TOOLS = {"command": "python", "args": ["-m", "agentbox.sandbox.demo_tools"]}


@contextlib.asynccontextmanager
async def mcp_upstream() -> AsyncIterator[str]:
    """A real MCP server (streamable HTTP) on 127.0.0.1 that only answers UPSTREAM_TOKEN; yields its URL."""
    verifier = StaticTokenVerifier({UPSTREAM_TOKEN: {"client_id": "e2e", "scopes": []}})
    server = FastMCP("e2e-upstream", auth=verifier)

    @server.tool
    def shout(text: str) -> str:
        """Upper-case the text."""
        return text.upper()

    async with serve(server.http_app(), lifespan="on") as base:  # the MCP app's session manager runs in it
        yield f"{base}/mcp"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def stack(kube, postgres, tmp_path_factory) -> AsyncIterator[Stack]:
    async with running_stack(kube, postgres.app_dsn, tmp_path_factory.mktemp("e2e"), release="abx-e2e",
                             system_namespace="abx-e2e-system", scope=f"{TENANT_PREFIX}*",
                             tenant_prefix=TENANT_PREFIX) as running:
        yield running


@pytest_asyncio.fixture(autouse=True, loop_scope="session")
async def tenants_removed_after_each_test(stack, kube) -> AsyncIterator[None]:
    """Each test's tenant namespaces go when it ends, while the operator runs (the database goes with
    the module)."""
    yield
    while stack.orgs:
        await delete_tenant(kube, f"tenant-{stack.orgs.pop()}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack.api_url, timeout=30) as client:
        yield client


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def upstream() -> AsyncIterator[str]:
    async with mcp_upstream() as url:
        yield url


async def onboard(api: httpx.AsyncClient, stack: Stack) -> str:
    org = f"e2e{secrets.token_hex(3)}"
    created = await api.post("/api/v1/orgs", headers=stack.bearer(service_role=True),
                             json={"id": org, "name": f"Org {org}"})
    assert created.status_code == 201, created.text
    assert created.json()["namespace"] == f"tenant-{org}"
    stack.orgs.append(org)
    return org


async def eventually(probe: Callable[[], Any], what: str, stack: Stack, timeout: float = 60) -> Any:
    return await polling.eventually(probe, timeout=timeout, interval=0.3, what=what, details=stack.logs)


def condition(view: dict, kind: str) -> str | None:
    return next((c["status"] for c in view["conditions"] if c["type"] == kind), None)


async def session_view(api, headers, name) -> dict:
    response = await api.get(f"/api/v1/sessions/{name}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


async def until_ready(api, stack, headers, name) -> dict:
    async def ready():
        view = await session_view(api, headers, name)
        return view if view["ready"] else None
    # Generous: on a cluster shared with other suites the volume binder can lag by tens of seconds.
    return await eventually(ready, f"session {name} Ready", stack, timeout=150)


UNREACHABLE = "not reachable through the Kubernetes API"
retried_messages: list[str] = []  # the 503s `send` retried, each one audited as a failure


async def send(api, headers, name, content: str) -> httpx.Response:
    """POST a message as a frontend does: a 503 (the pod's port not reachable yet: on kwok its stand-in
    runner may still be starting) is retried after Retry-After."""
    for _ in range(15):
        sent = await api.post(f"/api/v1/sessions/{name}/message", headers=headers, json={"content": content})
        if sent.status_code != 503:
            return sent
        assert UNREACHABLE in sent.json()["detail"], sent.text
        retried_messages.append(name)
        await asyncio.sleep(float(sent.headers["Retry-After"]))
    return sent


async def agent_replies(api, stack, headers, name, content: str) -> list[dict]:
    """Send a message; return the conversation once the agent has answered it."""
    sent = await send(api, headers, name, content)
    assert sent.status_code == 200, sent.text

    async def answered():
        status = (await api.get(f"/api/v1/sessions/{name}/status", headers=headers)).json()
        messages = (await api.get(f"/api/v1/sessions/{name}/messages", headers=headers)).json()["messages"]
        asked = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"] == content]
        replied = asked and any(m["role"] == "agent" for m in messages[asked[-1] + 1:])
        return messages if replied and status["status"] == "stable" else None
    return await eventually(answered, f"the agent's answer to {content!r}", stack, timeout=30)


async def first_events(api, headers, name, count: int) -> list[str]:
    """The names of the first `count` server-sent events of the session's stream."""
    names: list[str] = []
    async with api.stream("GET", f"/api/v1/sessions/{name}/events", headers=headers,
                          timeout=httpx.Timeout(10, read=10)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            if line.startswith("event:"):
                names.append(line.split(":", 1)[1].strip())
                if len(names) >= count:
                    break
    return names


async def secret_values(kube, namespace: str, session: str) -> list[str]:
    """Every value of the session's Secret, decoded."""
    listed = json.loads(await kube.kubectl("get", "secrets", "-n", namespace, "-l",
                                           f"agentbox.dev/session={session}", "-o", "json"))
    return [base64.b64decode(value).decode(errors="replace")
            for secret in listed["items"] for value in (secret.get("data") or {}).values()]


async def test_the_frontend_journey(api, stack, upstream, kube):
    org = await onboard(api, stack)
    namespace = f"tenant-{org}"
    admin = stack.bearer(sub="ada@example.com", org=org, role="admin")

    configured = await api.post("/api/v1/mcp/configurations", headers=admin, json={
        "name": "tools", "transport": "streamable-http", "url": upstream,
        "authType": "bearer", "bearerToken": UPSTREAM_TOKEN})
    assert configured.status_code == 201, configured.text
    assert UPSTREAM_TOKEN not in configured.text
    demo = await api.post("/api/v1/mcp/configurations", headers=admin, json={
        "name": "demo", "transport": "stdio", "stdio": DEMO_TOOLS})
    assert demo.status_code == 201, demo.text

    created = await api.post("/api/v1/sessions", headers=admin, json={
        "name": "s1", "agent": {"runtime": "scripted"}, "mcpServers": [{"name": "tools"}, {"name": "demo"}]})
    assert created.status_code == 201, created.text
    assert created.json()["ready"] is False

    view = await until_ready(api, stack, admin, "s1")
    assert view["phase"] == "Running"

    async def mcp_ready():  # the operator's first probe of the HTTP server may finish after Ready
        return condition(await session_view(api, admin, "s1"), "MCPReady") == "True"
    await eventually(mcp_ready, "s1 MCPReady", stack, timeout=45)
    # The operator probed the HTTP server with the credential from its Secret, and the session's Secret
    # (never its ConfigMap) carries it to the gateway.
    probed = json.loads(await kube.kubectl("get", "mcpservers", "tools", "-n", namespace, "-o", "json"))
    assert [tool["name"] for tool in probed["status"]["tools"]] == ["shout"], probed["status"]
    assert UPSTREAM_TOKEN in await secret_values(kube, namespace, "s1")
    assert UPSTREAM_TOKEN not in await kube.kubectl("get", "configmaps", "-n", namespace, "-l",
                                                    "agentbox.dev/session=s1", "-o", "json")

    conversation = await agent_replies(api, stack, admin, "s1", "hello there")
    assert conversation[-1] == {**conversation[-1], "role": "agent", "content": "echo: hello there"}
    # The agent calls a tool through the session's gateway, which runs the stdio server beside itself.
    conversation = await agent_replies(api, stack, admin, "s1", 'tool demo_shout {"text": "quiet"}')
    assert conversation[-1] == {**conversation[-1], "role": "agent", "content": "QUIET"}, conversation
    events = await first_events(api, admin, "s1", 2)
    assert set(events) <= {"message_update", "status_change", "agent_error"} and events, events
    status = await api.get("/api/v1/sessions/s1/status", headers=admin)
    assert status.status_code == 200 and status.json()["status"] == "stable"

    suspended = await api.post("/api/v1/sessions/s1/suspend", headers=admin)
    assert suspended.status_code == 200 and suspended.json()["suspended"] is True

    async def pod_gone():
        view = await session_view(api, admin, "s1")
        pods = await kube.kubectl("get", "pods", "-n", f"tenant-{org}", "-l", "agentbox.dev/session=s1",
                                  "-o", "name")
        return view["phase"] == "Suspended" and not pods.strip()
    await eventually(pod_gone, "s1 suspended without a pod", stack)
    assert await kube.kubectl("get", "pvc", "-n", f"tenant-{org}", "-l", "agentbox.dev/session=s1",
                              "-o", "name")  # the workspace stays
    refused = await api.post("/api/v1/sessions/s1/message", headers=admin, json={"content": "anyone?"})
    assert refused.status_code == 409, refused.text

    resumed = await api.post("/api/v1/sessions/s1/resume", headers=admin)
    assert resumed.status_code == 200 and resumed.json()["suspended"] is False
    await until_ready(api, stack, admin, "s1")
    conversation = await agent_replies(api, stack, admin, "s1", "back again")
    assert conversation[-1]["content"] == "echo: back again"

    deleted = await api.delete("/api/v1/sessions/s1", headers=admin)
    assert deleted.status_code == 204, deleted.text

    async def gone():
        return (await api.get("/api/v1/sessions/s1", headers=admin)).status_code == 404
    await eventually(gone, "s1 deleted", stack)

    audit = await api.get("/api/v1/audit", headers=admin, params={"limit": 100})
    assert audit.status_code == 200, audit.text
    actions = [entry["action"] for entry in reversed(audit.json()["items"])]
    for step in ["mcp.configuration.create", "session.create", "session.message",
                 "session.suspend", "session.resume", "session.delete"]:
        assert step in actions, actions
    # Every step succeeded except the message sent while suspended, which is there as refused, and any
    # message retried while the pod's port was not reachable yet, there as failed.
    unsuccessful = [(e["action"], e["outcome"], e["reason"]) for e in audit.json()["items"]
                    if e["outcome"] != "success"]
    retried = [entry for entry in unsuccessful if UNREACHABLE in (entry[2] or "")]
    assert len(retried) == retried_messages.count("s1"), unsuccessful
    assert [entry[0] for entry in unsuccessful if entry not in retried] == ["session.message"], unsuccessful
    assert UPSTREAM_TOKEN not in audit.text
    verified = await api.get("/api/v1/audit/verify", headers=admin)
    assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text
    # Onboarding is the platform's act: it is in the platform's own log, whose chain verifies too.
    platform = stack.bearer(service_role=True)
    onboarded = await api.get("/api/v1/audit", headers=platform, params={"action": "org.create"})
    assert any(entry["target"] == f"org/{org}" for entry in onboarded.json()["items"]), onboarded.text
    verified = await api.get("/api/v1/audit/verify", headers=platform)
    assert verified.status_code == 200 and verified.json()["ok"] is True, verified.text


async def test_an_idle_session_sleeps_and_a_message_wakes_it(api, stack, kube):
    org = await onboard(api, stack)
    user = stack.bearer(sub="ida@example.com", org=org, role="user")
    created = await api.post("/api/v1/sessions", headers=user, json={
        "name": "nap", "agent": {"runtime": "scripted"}, "lifecycle": {"idleTimeout": "15s"}})
    assert created.status_code == 201, created.text
    await until_ready(api, stack, user, "nap")
    conversation = await agent_replies(api, stack, user, "nap", "write notes.txt kept across naps")
    assert conversation[-1]["content"] == "wrote notes.txt"

    async def asleep():
        view = await session_view(api, user, "nap")
        pods = await kube.kubectl("get", "pods", "-n", f"tenant-{org}", "-l", "agentbox.dev/session=nap",
                                  "-o", "name")
        suspended = next(c for c in view["conditions"] if c["type"] == "Suspended")
        return (view["phase"] == "Suspended" and suspended["reason"] == "IdleTimeoutReached"
                and not pods.strip())
    await eventually(asleep, "nap suspended for idleness, its pod gone", stack, timeout=60)
    assert (await session_view(api, user, "nap"))["suspended"] is True
    assert await kube.kubectl("get", "pvc", "-n", f"tenant-{org}", "-l", "agentbox.dev/session=nap",
                              "-o", "name")  # the workspace stays

    # One message wakes it: the call waits for the new pod, then the agent answers from the same workspace.
    woken = await api.post("/api/v1/sessions/nap/message", headers=user, json={"content": "read notes.txt"},
                           timeout=150)
    assert woken.status_code == 200, woken.text
    view = await session_view(api, user, "nap")
    assert view["phase"] == "Running" and view["suspended"] is False

    async def answered():
        messages = (await api.get("/api/v1/sessions/nap/messages", headers=user)).json()["messages"]
        return messages if messages[-1] == {**messages[-1], "role": "agent", "content": "kept across naps"} \
            else None
    messages = await eventually(answered, "the woken agent's answer", stack, timeout=30)
    # The conversation from before the nap is there too (kept on the workspace, not in the old pod).
    assert [m["content"] for m in messages] == ["write notes.txt kept across naps", "wrote notes.txt",
                                                "read notes.txt", "kept across naps"]

    # A user's own suspend is not undone by a message: 409, naming the way out.
    suspended = await api.post("/api/v1/sessions/nap/suspend", headers=user)
    assert suspended.status_code == 200, suspended.text
    refused = await api.post("/api/v1/sessions/nap/message", headers=user, json={"content": "anyone?"})
    assert refused.status_code == 409 and "/resume" in refused.json()["detail"], refused.text


async def test_a_bad_token_is_refused_and_audited_nowhere_else(api, stack):
    org = await onboard(api, stack)
    forged = stack.bearer(sub="mallory", org=org, role="admin", secret="not-the-secret-" * 4)
    for headers in ({}, forged, {"Authorization": "Bearer not-a-jwt"}):
        response = await api.get("/api/v1/sessions", headers=headers)
        assert response.status_code == 401, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
    user = stack.bearer(sub="bob", org=org, role="user")
    assert (await api.post("/api/v1/orgs", headers=user, json={"id": "e2ex", "name": "x"})).status_code == 403


async def test_another_orgs_session_is_not_found(api, stack):
    org_a, org_b = await onboard(api, stack), await onboard(api, stack)
    alice = stack.bearer(sub="alice", org=org_a, role="admin")
    mallory = stack.bearer(sub="mallory", org=org_b, role="admin")
    created = await api.post("/api/v1/sessions", headers=alice, json={"name": "private",
                                                                      "agent": {"runtime": "scripted"}})
    assert created.status_code == 201, created.text
    for method, path in [("GET", ""), ("GET", "/messages"), ("POST", "/suspend"), ("DELETE", "")]:
        response = await api.request(method, f"/api/v1/sessions/private{path}", headers=mallory)
        assert response.status_code == 404, (method, path, response.text)
    response = await api.post("/api/v1/sessions/private/message", headers=mallory, json={"content": "hi"})
    assert response.status_code == 404
    assert (await api.get("/api/v1/sessions", headers=mallory)).json() == []
    assert (await api.get("/api/v1/sessions/private", headers=alice)).status_code == 200


async def test_a_broken_mcp_server_does_not_stop_the_session(api, stack):
    org = await onboard(api, stack)
    admin = stack.bearer(sub="ada", org=org, role="admin")
    nowhere = f"http://127.0.0.1:{free_port()}/mcp"  # nothing listens there
    configured = await api.post("/api/v1/mcp/configurations", headers=admin, json={
        "name": "broken", "transport": "streamable-http", "url": nowhere})
    assert configured.status_code == 201, configured.text
    created = await api.post("/api/v1/sessions", headers=admin, json={
        "name": "s2", "agent": {"runtime": "scripted"}, "mcpServers": [{"name": "broken"}]})
    assert created.status_code == 201, created.text

    async def started_without_mcp():
        view = await session_view(api, admin, "s2")
        return view if view["phase"] == "Running" and condition(view, "MCPReady") == "False" else None
    view = await eventually(started_without_mcp, "s2 Running with MCPReady False", stack, timeout=150)
    assert view["ready"] is True, view
    conversation = await agent_replies(api, stack, admin, "s2", "still here?")
    assert conversation[-1]["content"] == "echo: still here?"


# Served namespace by namespace (-n), kopf holds three watch connections per namespace: a bounded
# connection pool once starved every tenant after the fifth.
async def test_a_sixth_tenant_is_served_like_the_first(api, stack):
    orgs = [await onboard(api, stack) for _ in range(6)]
    admin = stack.bearer(sub="ada", org=orgs[-1], role="admin")
    created = await api.post("/api/v1/sessions", headers=admin, json={"name": "s6",
                                                                      "agent": {"runtime": "scripted"}})
    assert created.status_code == 201, created.text

    async def seen():
        return (await session_view(api, admin, "s6"))["phase"] is not None
    await eventually(seen, "s6 seen by the operator", stack, timeout=45)
