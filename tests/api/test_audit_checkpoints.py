"""Signed audit checkpoints through the running API (issue #12): the background task signs the chain
heads, GET /api/v1/audit/checkpoint serves the latest, and GET /api/v1/audit/verify reports a chain a
superuser rewound, which it reported as intact without a checkpoint."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from fixtures.database import rewind_audit_chain
from pydantic import SecretStr

from agentbox.api.app import Services, create_app
from agentbox.api.audit_checkpoints import CheckpointError
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256

ORG = "anchored"
ADMIN = {"Authorization": f"Bearer {hs256(sub='admin', app_metadata={'org_id': ORG, 'role': 'admin'})}"}


def signing_settings(directory: Path, key: str | None = None) -> Settings:
    key = key or base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()
    return Settings(audit_checkpoint_signing_key=SecretStr(key), audit_checkpoint_dir=directory,
                    audit_checkpoint_interval_seconds=0.2)


@contextlib.asynccontextmanager
async def running_api(postgres, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app with its lifespan (the background checkpointer) on the module's database."""
    database = Database(postgres.app_dsn)
    verifier = TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET)
    app = create_app(services_override=Services(settings=settings, database=database, verifier=verifier))
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app), base_url="http://api.test", headers=ADMIN) as client:
            yield client
    finally:
        await database.close()


async def seed(postgres, client: httpx.AsyncClient, rows: int) -> None:
    conn = await asyncpg.connect(postgres.superuser_dsn)
    try:
        await conn.execute("INSERT INTO organizations (id, name) VALUES ($1, $1) ON CONFLICT DO NOTHING", ORG)
    finally:
        await conn.close()
    for n in range(rows):  # each mutation writes one audit row
        created = await client.post("/api/v1/prompts", json={"scope": "org", "name": f"p{n}", "content": "x"})
        assert created.status_code == 201, created.text


async def signed_head(client: httpx.AsyncClient, seq: int) -> dict:
    """The latest checkpoint once the background task has signed the chain up to `seq`."""
    for _ in range(50):
        answer = await client.get("/api/v1/audit/checkpoint")
        if answer.status_code == 200 and answer.json()["seq"] == seq:
            return answer.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"no checkpoint at seq {seq}: {answer.status_code} {answer.text}")


async def test_the_running_api_signs_the_head_and_verify_reports_a_rewound_chain(postgres, tmp_path, caplog):
    caplog.set_level(logging.INFO, "agentbox.api.audit")
    async with running_api(postgres, signing_settings(tmp_path)) as client:
        await seed(postgres, client, 5)
        checkpoint = await signed_head(client, 5)
        # The public key the API logs at start-up is all it takes to check a checkpoint.
        announced = next(r for r in caplog.records if r.getMessage().startswith("audit checkpoints are"))
        public_key = Ed25519PublicKey.from_public_bytes(base64.b64decode(announced.public_key))
        claims = jwt.decode(checkpoint["token"], public_key, algorithms=["EdDSA"])
        assert (claims["sub"], claims["seq"], claims["hash"]) == (f"org:{ORG}", 5, checkpoint["hash"])
        held = (await client.get("/api/v1/audit/verify")).json()
        assert held["ok"] and held["checkpoint"]["seq"] == 5

        await rewind_audit_chain(postgres.superuser_dsn, ORG, to_seq=3)
        report = (await client.get("/api/v1/audit/verify")).json()
        assert not report["ok"] and report["headSeq"] == 3 and report["checkpoint"]["seq"] == 5
        assert report["firstBroken"]["seq"] == 4 and "removed" in report["firstBroken"]["reason"]

        # With the store gone, the checkpoint the org kept still holds the database to it.
        (tmp_path / f"org-{ORG}.jwt").unlink()
        kept = await client.get("/api/v1/audit/verify", params={"checkpoint": checkpoint["token"]})
        assert kept.status_code == 200 and not kept.json()["ok"]

    # The same rewound chain, verified by an API without checkpoints: the defect of issue #12.
    async with running_api(postgres, Settings()) as client:
        alone = (await client.get("/api/v1/audit/verify")).json()
        assert alone["ok"] and alone["headSeq"] == 3 and alone["checkpoint"] is None


async def test_a_checkpoint_the_api_does_not_trust_is_a_problem_naming_the_field(postgres, tmp_path):
    async with running_api(postgres, signing_settings(tmp_path / "one")) as first:
        await seed(postgres, first, 1)
        foreign = await signed_head(first, (await first.get("/api/v1/audit/verify")).json()["headSeq"])
    async with running_api(postgres, signing_settings(tmp_path / "two")) as client:
        for token in (foreign["token"], "not-a-checkpoint"):
            answer = await client.get("/api/v1/audit/verify", params={"checkpoint": token})
            assert answer.status_code == 422
            assert answer.headers["content-type"] == "application/problem+json"
            assert [error["field"] for error in answer.json()["errors"]] == ["query.checkpoint"]


async def test_a_malformed_signing_key_stops_the_start(postgres, tmp_path):
    with pytest.raises(CheckpointError, match="Ed25519 private key"):
        async with running_api(postgres, signing_settings(tmp_path, key="bm90IGEga2V5")):
            pass
