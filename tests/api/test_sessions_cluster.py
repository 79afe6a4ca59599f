"""Orgs and sessions over HTTP against the real cluster and database; the runner a stand-in on 127.0.0.1,
reached as the session's status.endpoint (the `service` transport).
Reads are served from the watch-backed caches here (the other cluster tests run without them: live reads)."""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from contextlib import AsyncExitStack
from datetime import datetime

import asyncpg
import httpx
import pytest_asyncio
from fixtures.polling import eventually
from kubernetes_asyncio import client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agentbox.api.app import Services, create_app, start_caches
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.kube import Kube as ApiKube
from agentbox.api.runner_client import RunnerClient
from agentbox.api.settings import Settings
from agentbox.crds.naming import (
    LAST_ACTIVITY_ANNOTATION,
    REQUEST_ID_ANNOTATION,
    SUSPEND_REASON_ANNOTATION,
    child_name,
)

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

RUNNER_TOKEN = secrets.token_urlsafe(16)
RESUME_TIMEOUT = 2  # no operator here: a resumed session is Ready only when a test says so
ORG_A, ORG_B = f"a{secrets.token_hex(4)}", f"b{secrets.token_hex(4)}"


def bearer(sub: str, org: str | None, role: str = "user", **extra) -> dict[str, str]:
    return {"Authorization": f"Bearer {hs256(sub=sub, app_metadata={'org_id': org, 'role': role}, **extra)}"}


USER_A, USER_A2 = bearer("alice@example.com", ORG_A), bearer("bob", ORG_A)
ADMIN_A, ADMIN_B = bearer("admin-a", ORG_A, "admin"), bearer("admin-b", ORG_B, "admin")
PLATFORM = {"Authorization": f"Bearer {hs256(sub='operator', role='service_role', app_metadata=None)}"}


class StandInRunner:
    """The runner's HTTP surface, just enough to see what the API forwards."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.busy_until = 0.0  # a turn runs (status "running") until this time.monotonic()
        self.app = Starlette(routes=[Route("/status", self.status), Route("/messages", self.messages),
                                     Route("/message", self.message, methods=["POST"]),
                                     Route("/events", self.events)])

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("authorization") == f"Bearer {RUNNER_TOKEN}"

    async def status(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({}, status_code=401)
        running = time.monotonic() < self.busy_until
        return JSONResponse({"status": "running" if running else "stable", "agent_type": "scripted",
                             "last_activity": None})

    async def messages(self, request: Request) -> Response:
        return JSONResponse({"messages": [{"id": 0, "role": "agent", "content": "hi"}]}
                            if self._authorised(request) else {}, status_code=200 if self._authorised(request)
                            else 401)

    async def message(self, request: Request) -> Response:
        if not self._authorised(request):
            return JSONResponse({}, status_code=401)
        self.received.append(await request.json())
        return JSONResponse({"ok": True})

    async def events(self, request: Request) -> Response:
        async def two_events():
            yield b"event: status_change\ndata: {\"status\": \"running\"}\n\n"
            yield b"event: message_update\ndata: {\"id\": 1}\n\n"
        return StreamingResponse(two_events(), media_type="text/event-stream")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def runner():
    stand_in = StandInRunner()
    async with serve(stand_in.app) as url:
        stand_in.url = url
        yield stand_in


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def setup(postgres, kube, runner):
    superuser = await asyncpg.connect(postgres.superuser_dsn)
    await superuser.execute("INSERT INTO system_prompts (scope, name, content) "
                            "VALUES ('global', 'g', 'BE KIND')")
    database = Database(postgres.app_dsn)
    api_client = client.ApiClient(configuration=kube._configuration)
    cluster = ApiKube(api_client)
    http = httpx.AsyncClient(timeout=5)
    settings = Settings(resume_timeout_seconds=RESUME_TIMEOUT)
    services = Services(settings=settings, database=database, kube=cluster,
                        verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                               hs256_secret=HS256_SECRET),
                        runner=RunnerClient(http))
    app = create_app(services_override=services)
    async with AsyncExitStack() as caches, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test") as api:
        await start_caches(services, caches)
        async with asyncio.timeout(30):
            await services.sessions_cache.wait_synced()
            await services.mcp_servers_cache.wait_synced()
        yield api, cluster, superuser
    for org in (ORG_A, ORG_B):
        await kube.kubectl("delete", "namespace", f"tenant-{org}", "--ignore-not-found", "--wait=false")
    await http.aclose()
    await api_client.close()
    await database.close()
    await superuser.close()


async def test_orgs_get_their_namespace_and_only_the_platform_makes_them(setup):
    api, cluster, _ = setup
    denied = await api.post("/api/v1/orgs", headers=ADMIN_A, json={"id": ORG_A, "name": "A"})
    assert denied.status_code == 403
    for org in (ORG_A, ORG_B):
        response = await api.post("/api/v1/orgs", headers=PLATFORM, json={"id": org, "name": org.upper()})
        assert response.status_code == 201, response.text
    namespace = await cluster.core.read_namespace(f"tenant-{ORG_A}")
    assert namespace.metadata.labels["agentbox.dev/tenant"] == ORG_A
    again = await api.post("/api/v1/orgs", headers=PLATFORM, json={"id": ORG_A, "name": "dup"})
    assert again.status_code == 409
    bad = await api.post("/api/v1/orgs", headers=PLATFORM, json={"id": "../etc", "name": "x"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "body.id"


async def _make_ready(cluster: ApiKube, namespace: str, name: str, endpoint: str,
                      member: str | None = None) -> None:
    """What the operator would do: the runner-token Secret, then a Ready condition. `member`: as for a
    session that claimed that pool member (its children keep the member's name)."""
    await cluster.core.create_namespaced_secret(namespace, client.V1Secret(
        metadata=client.V1ObjectMeta(name=member or child_name(name), labels={"agentbox.dev/session": name}),
        data={"runner-token": base64.b64encode(RUNNER_TOKEN.encode()).decode()}))
    if member:
        await cluster.custom.patch_namespaced_custom_object(
            "agentbox.dev", "v1alpha1", namespace, "agentsessions", name,
            {"metadata": {"annotations": {"agentbox.dev/pool-member": member}}},
            _content_type="application/merge-patch+json")
    await cluster.custom.patch_namespaced_custom_object_status(
        "agentbox.dev", "v1alpha1", namespace, "agentsessions", name,
        {"status": {"phase": "Running", "endpoint": endpoint, "poolMember": member, "conditions": [
            {"type": "Ready", "status": "True", "reason": "SessionReady", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}},
        _content_type="application/merge-patch+json")



async def _is_ready(api: httpx.AsyncClient, name: str) -> bool:
    return (await api.get(f"/api/v1/sessions/{name}", headers=USER_A)).json()["ready"]


async def test_a_session_end_to_end_and_cross_tenant_probes(setup, runner):
    api, cluster, superuser = setup
    namespace = f"tenant-{ORG_A}"
    created = await api.post("/api/v1/sessions", headers=USER_A,
                             json={"name": "s1", "agent": {"runtime": "scripted"}})
    assert created.status_code == 201, created.text
    assert created.json()["user"] == "alice@example.com" and created.json()["ready"] is False
    resource = await cluster.get_session(namespace, "s1")
    assert resource["spec"]["systemPrompt"] == "BE KIND"
    assert resource["spec"]["tenant"] == {"org": ORG_A, "user": "alice@example.com"}

    assert (await api.get("/api/v1/sessions/s1/status", headers=USER_A)).status_code == 409
    await _make_ready(cluster, namespace, "s1", runner.url)
    await eventually(lambda: _is_ready(api, "s1"), timeout=10, interval=0.05)
    status = await api.get("/api/v1/sessions/s1/status", headers=USER_A)
    assert status.status_code == 200 and status.json()["agent_type"] == "scripted"
    sent = await api.post("/api/v1/sessions/s1/message", headers=USER_A, json={"content": "hello"})
    assert sent.status_code == 200 and runner.received == [{"content": "hello", "type": "user"}]
    messages = (await api.get("/api/v1/sessions/s1/messages", headers=USER_A)).json()
    assert messages["messages"][0]["content"] == "hi"
    events = await api.get("/api/v1/sessions/s1/events", headers=USER_A)
    assert events.headers["content-type"].startswith("text/event-stream")
    assert b"event: message_update" in events.content
    annotations = (await cluster.get_session(namespace, "s1"))["metadata"]["annotations"]
    assert "agentbox.dev/last-activity" in annotations

    # Another user of the org, and another org's admin: 404 everywhere, nothing changes, all audited.
    assert (await api.get("/api/v1/sessions/s1", headers=USER_A2)).status_code == 404
    assert [s["name"] for s in (await api.get("/api/v1/sessions", headers=USER_A2)).json()] == []
    assert [s["name"] for s in (await api.get("/api/v1/sessions", headers=ADMIN_A)).json()] == ["s1"]
    before_b = await superuser.fetchval("SELECT count(*) FROM audit_logs WHERE org_id = $1", ORG_B)
    for method, path, body in [("GET", "", None), ("DELETE", "", None), ("POST", "/suspend", None),
                               ("POST", "/resume", None), ("POST", "/message", {"content": "x"}),
                               ("GET", "/messages", None), ("GET", "/status", None),
                               ("GET", "/events", None)]:
        response = await api.request(method, f"/api/v1/sessions/s1{path}", headers=ADMIN_B, json=body)
        assert response.status_code == 404, (method, path, response.text)
    after_b = await superuser.fetch("SELECT action, outcome FROM audit_logs WHERE org_id = $1 ORDER BY seq",
                                    ORG_B)
    assert [tuple(r) for r in after_b[before_b:]] == [
        ("session.delete", "denied"), ("session.suspend", "denied"), ("session.resume", "denied"),
        ("session.message", "denied")]
    assert runner.received == [{"content": "hello", "type": "user"}]
    assert (await cluster.get_session(namespace, "s1"))["spec"]["lifecycle"].get("suspend", False) is False

    suspended = await api.post("/api/v1/sessions/s1/suspend", headers=USER_A)
    assert suspended.status_code == 200 and suspended.json()["suspended"] is True
    assert (await api.delete("/api/v1/sessions/s1", headers=USER_A)).status_code == 204
    assert (await api.get("/api/v1/sessions/s1", headers=USER_A)).status_code == 404


async def test_a_session_on_a_claimed_pool_member_is_reached_with_the_members_secret(setup, runner):
    """The runner token of a warm session is in its pool member's Secret, found by the session's
    annotation; a Secret of that name labelled for another session is never used."""
    api, cluster, _ = setup
    namespace = f"tenant-{ORG_A}"
    created = await api.post("/api/v1/sessions", headers=USER_A, json={"name": "warm", "agent": {
        "runtime": "scripted"}})
    assert created.status_code == 201 and created.json()["warmStart"] is False
    await _make_ready(cluster, namespace, "warm", runner.url, member="pool-a-1a2b3c4d")
    await eventually(lambda: _is_ready(api, "warm"), timeout=10, interval=0.05)
    assert (await api.get("/api/v1/sessions/warm", headers=USER_A)).json()["warmStart"] is True
    before = len(runner.received)
    sent = await api.post("/api/v1/sessions/warm/message", headers=USER_A, json={"content": "warm hello"})
    assert sent.status_code == 200 and runner.received[before:] == [{"content": "warm hello", "type": "user"}]

    await api.post("/api/v1/sessions", headers=USER_A, json={"name": "thief", "agent": {
        "runtime": "scripted"}})
    await cluster.custom.patch_namespaced_custom_object(
        "agentbox.dev", "v1alpha1", namespace, "agentsessions", "thief",
        {"metadata": {"annotations": {"agentbox.dev/pool-member": "pool-a-1a2b3c4d"}}},
        _content_type="application/merge-patch+json")
    await cluster.custom.patch_namespaced_custom_object_status(
        "agentbox.dev", "v1alpha1", namespace, "agentsessions", "thief",
        {"status": {"phase": "Running", "endpoint": runner.url, "conditions": [
            {"type": "Ready", "status": "True", "reason": "SessionReady", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, _content_type="application/merge-patch+json")
    await eventually(lambda: _is_ready(api, "thief"), timeout=10, interval=0.05)
    refused = await api.post("/api/v1/sessions/thief/message", headers=USER_A, json={"content": "x"})
    assert refused.status_code == 409 and "runner token" in refused.text
    assert runner.received[before + 1:] == []
    for name in ("warm", "thief"):
        assert (await api.delete(f"/api/v1/sessions/{name}", headers=USER_A)).status_code == 204


async def test_the_request_behind_a_change_is_named_on_the_session_as_in_its_audit_row(setup, runner):
    api, cluster, superuser = setup
    namespace = f"tenant-{ORG_A}"

    async def audited(action: str) -> str:
        return await superuser.fetchval(
            "SELECT request_id FROM audit_logs WHERE org_id = $1 AND action = $2 "
            "AND target = 'session/traced' ORDER BY seq DESC LIMIT 1", ORG_A, action)

    async def named() -> str:
        annotations = (await cluster.get_session(namespace, "traced"))["metadata"].get("annotations") or {}
        return annotations.get(REQUEST_ID_ANNOTATION)

    created = await api.post("/api/v1/sessions", headers={**USER_A, "x-request-id": "req-create-traced"},
                             json={"name": "traced", "agent": {"runtime": "scripted"}})
    assert created.status_code == 201, created.text
    assert await named() == await audited("session.create") == "req-create-traced"
    for action in ("suspend", "resume"):  # no id offered: the one the API made up, as its answer says
        response = await api.post(f"/api/v1/sessions/traced/{action}", headers=USER_A)
        assert response.status_code == 200, response.text
        assert await named() == await audited(f"session.{action}") == response.headers["x-request-id"]

    # A message stamps activity and nothing else: the session keeps naming the change behind its state,
    # and shows the stamp before the operator's status catches up.
    await _make_ready(cluster, namespace, "traced", runner.url)
    await eventually(lambda: _is_ready(api, "traced"), timeout=10, interval=0.05)
    sent = await api.post("/api/v1/sessions/traced/message", headers=USER_A, json={"content": "hi"})
    assert sent.status_code == 200, sent.text
    assert await named() == response.headers["x-request-id"]
    view = (await api.get("/api/v1/sessions/traced", headers=USER_A)).json()
    annotations = (await cluster.get_session(namespace, "traced"))["metadata"]["annotations"]
    stamp = datetime.fromisoformat(annotations[LAST_ACTIVITY_ANNOTATION])
    assert view["lastActivityTime"] and datetime.fromisoformat(view["lastActivityTime"]) == stamp
    assert (await api.delete("/api/v1/sessions/traced", headers=USER_A)).status_code == 204


async def test_session_bodies_are_validated_without_side_effects(setup):
    api, cluster, _ = setup
    for body, field in [({"agent": {"runtime": "nope"}}, "body.agent.runtime"),
                        ({"name": "../../x"}, "body.name"), ({"surprise": True}, "body.surprise"),
                        ({"agent": {"runtime": "custom"}}, "body.agent")]:
        response = await api.post("/api/v1/sessions", headers=USER_A, json=body)
        assert response.status_code == 422, response.text
        assert any(error["field"].startswith(field) for error in response.json()["errors"])
    assert await cluster.list_sessions(f"tenant-{ORG_A}", "agentbox.dev/org") == []


async def test_the_cache_follows_outside_writes_and_lists_exactly_what_a_live_read_would(setup):
    api, cluster, _ = setup
    services = api._transport.app.state.services
    namespace = f"tenant-{ORG_A}"
    made_by_hand = {"apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
                    "metadata": {"name": "by-hand", "labels": {"agentbox.dev/org": ORG_A,
                                                               "agentbox.dev/user": "bob"}},
                    "spec": {"tenant": {"org": ORG_A, "user": "bob"}, "agent": {"runtime": "scripted"}}}
    unlabelled = {**made_by_hand, "metadata": {"name": "unlabelled"}}
    for body in (made_by_hand, unlabelled):
        await cluster.custom.create_namespaced_custom_object("agentbox.dev", "v1alpha1", namespace,
                                                             "agentsessions", body)
    created = await api.post("/api/v1/sessions", headers=USER_A,
                             json={"name": "alices", "agent": {"runtime": "scripted"}})
    assert created.status_code == 201, created.text

    async def names(headers) -> list[str]:
        return [s["name"] for s in (await api.get("/api/v1/sessions", headers=headers)).json()]

    await eventually(lambda: _has(names(ADMIN_A), "by-hand"), timeout=10, interval=0.05)
    cached = {who: await names(headers) for who, headers in
              (("admin", ADMIN_A), ("alice", USER_A), ("bob", USER_A2), ("other org", ADMIN_B))}
    cache, services.sessions_cache = services.sessions_cache, None
    try:
        live = {who: await names(headers) for who, headers in
                (("admin", ADMIN_A), ("alice", USER_A), ("bob", USER_A2), ("other org", ADMIN_B))}
    finally:
        services.sessions_cache = cache
    assert cached == live == {"admin": ["alices", "by-hand"], "alice": ["alices"], "bob": ["by-hand"],
                              "other org": []}

    await cluster.delete_session(namespace, "by-hand")
    await eventually(lambda: _lacks(names(ADMIN_A), "by-hand"), timeout=10, interval=0.05)


async def _has(names, name: str) -> bool:
    return name in await names


async def _lacks(names, name: str) -> bool:
    return name not in await names


async def test_a_message_resumes_a_session_suspended_for_idleness_not_one_a_user_suspended(setup, runner):
    api, cluster, _ = setup
    namespace = f"tenant-{ORG_A}"
    for name in ("idler", "sleeper"):
        created = await api.post("/api/v1/sessions", headers=USER_A,
                                 json={"name": name, "agent": {"runtime": "scripted"}})
        assert created.status_code == 201, created.text
    idle = {"metadata": {"annotations": {SUSPEND_REASON_ANNOTATION: "IdleTimeoutReached"}},
            "spec": {"lifecycle": {"suspend": True}}}
    await cluster.patch_session(namespace, "idler", idle)  # as the operator suspends an idle session
    assert (await api.post("/api/v1/sessions/sleeper/suspend", headers=USER_A)).status_code == 200

    async def suspended(name):
        return (await api.get(f"/api/v1/sessions/{name}", headers=USER_A)).json()["suspended"]
    await eventually(lambda: suspended("idler"), timeout=10, interval=0.05)

    received = len(runner.received)
    refused = await api.post("/api/v1/sessions/sleeper/message", headers=USER_A, json={"content": "hey"})
    assert refused.status_code == 409 and "/api/v1/sessions/sleeper/resume" in refused.json()["detail"]
    assert (await cluster.get_session(namespace, "sleeper"))["spec"]["lifecycle"]["suspend"] is True

    # Resumed at once, but nothing makes it Ready here: a clear 504 naming the bound.
    timed_out = await api.post("/api/v1/sessions/idler/message", headers=USER_A, json={"content": "hey"})
    assert timed_out.status_code == 504, timed_out.text
    assert f"not ready after {RESUME_TIMEOUT} s" in timed_out.json()["detail"]
    resource = await cluster.get_session(namespace, "idler")
    assert resource["spec"]["lifecycle"]["suspend"] is False
    assert SUSPEND_REASON_ANNOTATION not in resource["metadata"]["annotations"]
    assert LAST_ACTIVITY_ANNOTATION in resource["metadata"]["annotations"]  # a full idleTimeout again

    # Idle again; this time the session turns Ready while the message waits, and the message goes through.
    await cluster.patch_session(namespace, "idler", idle)
    await eventually(lambda: suspended("idler"), timeout=10, interval=0.05)
    waiting = asyncio.create_task(api.post("/api/v1/sessions/idler/message", headers=USER_A,
                                           json={"content": "wake up"}))
    await asyncio.sleep(0.5)
    assert not waiting.done()
    await _make_ready(cluster, namespace, "idler", runner.url)
    delivered = await waiting
    assert delivered.status_code == 200, delivered.text
    assert runner.received[received:] == [{"content": "wake up", "type": "user"}]


async def test_a_running_turn_counts_as_activity_until_it_ends(setup, runner):
    api, cluster, _ = setup
    namespace = f"tenant-{ORG_A}"
    created = await api.post("/api/v1/sessions", headers=USER_A, json={
        "name": "worker", "agent": {"runtime": "scripted"}, "lifecycle": {"idleTimeout": "2s"}})
    assert created.status_code == 201, created.text
    await _make_ready(cluster, namespace, "worker", runner.url)
    await eventually(lambda: _is_ready(api, "worker"), timeout=10, interval=0.05)

    async def stamp():
        return (await cluster.get_session(namespace, "worker"))["metadata"]["annotations"][
            LAST_ACTIVITY_ANNOTATION]

    runner.busy_until = time.monotonic() + 3.5  # the agent works on, nobody calls the API meanwhile
    sent = await api.post("/api/v1/sessions/worker/message", headers=USER_A, json={"content": "work"})
    assert sent.status_code == 200, sent.text
    first = await stamp()
    await asyncio.sleep(2.5)
    during = await stamp()
    assert during > first, "the running turn was recorded as activity"
    await asyncio.sleep(2.5)  # the turn ended a second ago: the last record is its end
    ended = await stamp()
    assert ended > during
    await asyncio.sleep(2)
    assert await stamp() == ended, "nothing is recorded once the turn is over"
