"""Session routes against the real PostgreSQL, with Kubernetes and the session's runner faked: what the
database sees while a message is on its way, and an org whose tenant namespace is missing."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import asyncpg
import httpx
import pytest_asyncio

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.kube import KubeError
from agentbox.api.runner_client import RunnerClient
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256

ORG = "hooli"
USER = {"Authorization": f"Bearer {hs256(sub='gavin', app_metadata={'org_id': ORG, 'role': 'user'})}"}
NO_NAMESPACE_ORG = "pied-piper"


def ready_session(name: str) -> dict[str, Any]:
    return {"apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
            "metadata": {"name": name, "namespace": f"tenant-{ORG}", "annotations": {}, "labels": {}},
            "spec": {"tenant": {"org": ORG, "user": "gavin"}, "agent": {"runtime": "scripted"}},
            "status": {"phase": "Running", "endpoint": "http://runner.test:3284",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


class FakeKube:
    """The few calls the session routes make; a namespace it does not hold answers 404 to writes."""

    def __init__(self) -> None:
        self.sessions = {"busy": ready_session("busy")}

    async def get_session(self, namespace: str, name: str) -> dict[str, Any] | None:
        return copy.deepcopy(self.sessions.get(name)) if namespace == f"tenant-{ORG}" else None

    async def patch_session(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        return copy.deepcopy(self.sessions[name])

    async def runner_token(self, namespace: str, session: dict[str, Any]) -> str:
        return "runner-token"

    async def create_session(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        if namespace != f"tenant-{ORG}":
            raise KubeError(404, "Not Found")
        return body


class SlowRunner:
    """A runner that holds every message until released (or answers a server error when told to)."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.release = asyncio.Event()
        self.status = 200

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.received.set()
        await self.release.wait()
        return httpx.Response(self.status, json={"ok": self.status < 400})


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def superuser(postgres):
    conn = await asyncpg.connect(postgres.superuser_dsn)
    await conn.execute("INSERT INTO organizations (id, name) VALUES ($1, $1), ($2, $2)", ORG,
                       NO_NAMESPACE_ORG)
    yield conn
    await conn.close()


@pytest_asyncio.fixture(loop_scope="session")
async def stack(postgres, superuser):
    # One pooled connection: a request that held it across the runner call would starve every other.
    database = Database(postgres.app_dsn, max_size=1, acquire_timeout=1.0)
    runner = SlowRunner()
    http = httpx.AsyncClient(transport=httpx.MockTransport(runner))
    services = Services(settings=Settings(), database=database, kube=FakeKube(), runner=RunnerClient(http),
                        verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                               hs256_secret=HS256_SECRET))
    app = create_app(services_override=services)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://api.test") as api:
        yield api, runner
    await http.aclose()
    await database.close()


async def message_rows(superuser) -> list[tuple[str, str]]:
    return [(row["outcome"], row["reason"]) for row in await superuser.fetch(
        "SELECT outcome, reason FROM audit_logs WHERE org_id = $1 AND action = 'session.message' "
        "ORDER BY seq", ORG)]


async def test_a_message_on_its_way_holds_no_database_connection(stack, superuser):
    api, runner = stack
    before = await message_rows(superuser)
    sending = asyncio.create_task(api.post("/api/v1/sessions/busy/message", headers=USER,
                                           json={"content": "hello"}))
    try:
        await asyncio.wait_for(runner.received.wait(), 5)
        meanwhile = await api.get("/api/v1/prompts", headers=USER)  # needs the pool's one connection
    finally:
        runner.release.set()
    answer = await asyncio.wait_for(sending, 5)
    assert meanwhile.status_code == 200, meanwhile.text
    assert answer.status_code == 200, answer.text
    assert (await message_rows(superuser))[len(before):] == [("success", None)]


async def test_a_failed_delivery_still_writes_exactly_one_row(stack, superuser):
    api, runner = stack
    before = await message_rows(superuser)
    runner.status = 500
    runner.release.set()
    answer = await api.post("/api/v1/sessions/busy/message", headers=USER, json={"content": "hello"})
    assert answer.status_code == 502, answer.text
    rows = (await message_rows(superuser))[len(before):]
    assert [outcome for outcome, _ in rows] == ["failed"] and rows[0][1].startswith("502:")


async def test_an_org_without_its_namespace_is_told_it_is_not_provisioned(stack):
    api, _runner = stack
    token = hs256(sub="richard", app_metadata={"org_id": NO_NAMESPACE_ORG, "role": "user"})
    answer = await api.post("/api/v1/sessions", headers={"Authorization": f"Bearer {token}"},
                            json={"agent": {"runtime": "scripted"}})
    assert answer.status_code == 409, answer.text
    assert answer.headers["content-type"] == "application/problem+json"
    assert "not provisioned" in answer.json()["detail"]
