"""PostgreSQL going away under steady traffic (issue #12): every answer is the route's own or a 503 problem
with Retry-After, never a 500, and the same app serves again once the server is back, no restart needed.

The server really stops and starts (a longer outage) and really restarts with `pg_ctl restart -m fast`
(every connection cut at once, the server back within a moment) while workers keep sending requests to
routes that read in a transaction, write in one with the audit row inside it, and write an audit row on a
connection of its own (a refused request), plus the chain walk of the verifier."""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
import pytest_asyncio

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.problems import PROBLEM_MEDIA_TYPE
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

ORG = "restart-org"
ADMIN = {"Authorization": f"Bearer {hs256(sub='admin', app_metadata={'org_id': ORG, 'role': 'admin'})}"}
WORKERS = 8
STEADY_SECONDS = 1.0  # traffic before the outage, and again once the server is back
DOWN_SECONDS = 1.5  # how long the server stays stopped in the stop/start case


@dataclass(frozen=True)
class Call:
    name: str
    method: str
    path: str
    ok: int  # the route's own answer when the database is there


@dataclass(frozen=True)
class Answer:
    call: Call
    started: float
    finished: float
    status: int
    retry_after: str | None
    content_type: str
    text: str

    @property
    def acceptable(self) -> bool:
        if self.status == self.call.ok:
            return True
        return (self.status == 503 and self.retry_after is not None and self.retry_after.isdigit()
                and self.content_type.startswith(PROBLEM_MEDIA_TYPE))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(postgres):
    conn = await asyncpg.connect(postgres.superuser_dsn)
    try:
        await conn.execute("INSERT INTO organizations (id, name) VALUES ($1, $1)", ORG)
    finally:
        await conn.close()
    # Short timeouts, so a request that meets the outage answers within the test's time.
    database = Database(postgres.app_dsn, max_size=4, connect_timeout=1.0, acquire_timeout=1.5,
                        command_timeout=3.0)
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET)
    app = create_app(services_override=Services(settings=Settings(), database=database, verifier=verifier))
    try:
        async with serve(app) as url, httpx.AsyncClient(base_url=url, headers=ADMIN, timeout=30) as client:
            yield client
    finally:
        await database.close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def calls(api) -> list[Call]:
    seeded = await api.post("/api/v1/prompts", json={"scope": "org", "name": "seed", "content": "v0"})
    assert seeded.status_code == 201, seeded.text
    prompt = f"/api/v1/prompts/{seeded.json()['id']}"
    return [
        Call("create (transaction + audit row)", "POST", "/api/v1/prompts", 201),
        Call("update (row lock + audit row)", "PUT", prompt, 200),
        Call("list (read transaction)", "GET", "/api/v1/prompts", 200),
        Call("compose (read transaction)", "GET", "/api/v1/prompts/compose", 200),
        Call("audit list", "GET", "/api/v1/audit?limit=5", 200),
        Call("audit verify (cursor over the chain)", "GET", "/api/v1/audit/verify", 200),
        # Refused before any transaction: its `failed` audit row goes on a connection of its own.
        Call("refused create (audit row alone)", "POST", "/api/v1/prompts", 422),
    ]


_names = itertools.count()


async def _send(client: httpx.AsyncClient, call: Call) -> Answer:
    body = None
    if call.method in ("POST", "PUT"):
        body = {"name": f"p{next(_names)}", "content": "text"}
        if call.method == "POST":
            body["scope"] = "org"
        if call.ok == 422:
            body["priority"] = "not a number"
    started = time.monotonic()
    response = await client.request(call.method, call.path, json=body)
    return Answer(call, started, time.monotonic(), response.status_code, response.headers.get("retry-after"),
                  response.headers.get("content-type", ""), response.text[:300])


async def _traffic(client: httpx.AsyncClient, calls: list[Call], worker: int, stop: asyncio.Event,
                   answers: list[Answer]) -> None:
    for call in itertools.islice(itertools.cycle(calls), worker, None):
        if stop.is_set():
            return
        answers.append(await _send(client, call))


async def _stop_then_start(postgres) -> None:
    await asyncio.to_thread(postgres.server.stop)
    await asyncio.sleep(DOWN_SECONDS)
    await asyncio.to_thread(postgres.server.start)


async def _fast_restart(postgres) -> None:
    await asyncio.to_thread(postgres.server.restart)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("outage", [_stop_then_start, _fast_restart], ids=["stop-start", "fast-restart"])
async def test_an_outage_under_load_answers_503_with_retry_after_never_500_and_recovers(api, calls, postgres,
                                                                                        outage):
    answers: list[Answer] = []
    stop = asyncio.Event()
    workers = [asyncio.create_task(_traffic(api, calls, worker, stop, answers)) for worker in range(WORKERS)]
    try:
        await asyncio.sleep(STEADY_SECONDS)
        outage_started = time.monotonic()
        await outage(postgres)
        back = time.monotonic()
        await asyncio.sleep(2 * STEADY_SECONDS)
    finally:
        stop.set()
        await asyncio.gather(*workers)

    wrong = collections.Counter(f"{a.call.name}: {a.status} retry-after={a.retry_after} {a.content_type}"
                                for a in answers if not a.acceptable)
    assert not wrong, f"{wrong.total()} of {len(answers)} answers were neither the route's own nor a 503 " \
        f"with Retry-After: {dict(wrong)}"
    before = [a for a in answers if a.finished < outage_started]
    assert before and [f"{a.call.name}: {a.status} {a.text}" for a in before if a.status != a.call.ok] == []
    assert any(a.status == 503 for a in answers), "no request met the outage: the test proved nothing"
    # Back up: the pool has dropped the cut connections; a second after, every route answers as usual.
    settled = [a for a in answers if a.started > back + STEADY_SECONDS / 2]
    assert {a.call.name for a in settled} == {c.name for c in calls}
    assert [a for a in settled if a.status != a.call.ok] == []
    for call in calls:  # and one by one, on whatever connections the pool now holds
        answer = await _send(api, call)
        assert answer.status == call.ok, f"{call.name}: {answer.status} {answer.text}"
