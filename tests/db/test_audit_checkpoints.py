"""Signed audit checkpoints (issue #12): a superuser who rewinds a chain (deletes its newest rows and moves
its recorded head back) leaves a chain that verifies on its own; held to a checkpoint signed outside the
database, it does not."""

from __future__ import annotations

import base64
import logging
from datetime import UTC, datetime, timedelta

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fixtures.database import rewind_audit_chain
from pydantic import ValidationError

from agentbox.api.audit import AuditEvent, Checkpoint, record, verify_chain
from agentbox.api.audit_checkpoints import (
    CheckpointError,
    CheckpointKeys,
    Checkpoints,
    CheckpointStore,
    load_public_key,
    load_signing_key,
    public_key_text,
)
from agentbox.api.settings import Settings

from .conftest import create_orgs

SIGNED_AT = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def event(org: str | None, n: int) -> AuditEvent:
    return AuditEvent(org_id=org, action="prompt.update", outcome="success", actor_sub="alice",
                      request_id=f"req-{n}")


def signer(tmp_path, key: Ed25519PrivateKey | None = None) -> Checkpoints:
    return Checkpoints(CheckpointKeys(key or Ed25519PrivateKey.generate()), CheckpointStore(tmp_path))


async def write(db, org: str | None, count: int) -> None:
    for n in range(count):
        await record(db, event(org, n))


async def test_a_rewound_chain_verifies_alone_but_not_against_its_signed_checkpoint(postgres, app_db,
                                                                                   tmp_path):
    await create_orgs(app_db, "rewind")
    await write(app_db, "rewind", 6)
    checkpoints = signer(tmp_path)
    signed = await checkpoints.take(app_db)
    assert [(s.checkpoint.org_id, s.checkpoint.seq) for s in signed] == [("rewind", 6)]

    await rewind_audit_chain(postgres.superuser_dsn, "rewind", to_seq=4)

    alone = await verify_chain(app_db, "rewind")
    assert alone.ok and alone.head_seq == 4, "without a checkpoint the rewind goes unnoticed (issue #12)"
    stored = await checkpoints.latest("rewind")
    report = await verify_chain(app_db, "rewind", [stored.checkpoint])
    assert not report.ok and report.checkpoint == stored.checkpoint
    assert (report.first_broken.seq, report.first_broken.id) == (5, None)
    assert "ends at seq 4" in report.first_broken.reason and "removed" in report.first_broken.reason


async def test_a_chain_rewound_and_grown_again_differs_at_the_checkpoint_and_is_not_signed_again(
        postgres, app_db, tmp_path, caplog):
    await create_orgs(app_db, "regrow")
    await write(app_db, "regrow", 5)
    checkpoints = signer(tmp_path)
    await checkpoints.take(app_db)
    await rewind_audit_chain(postgres.superuser_dsn, "regrow", to_seq=2)
    await write(app_db, "regrow", 4)  # new rows 3..6: the chain is longer than the checkpoint again

    assert (await verify_chain(app_db, "regrow")).ok
    stored = (await checkpoints.latest("regrow")).checkpoint
    report = await verify_chain(app_db, "regrow", [stored])
    assert report.first_broken.seq == 5 and report.first_broken.id is not None
    assert "differs from the checkpoint" in report.first_broken.reason

    with caplog.at_level(logging.ERROR, "agentbox.api.audit.checkpoint"):
        assert [s for s in await checkpoints.take(app_db) if s.checkpoint.org_id == "regrow"] == []
    assert "no longer holds its checkpoint" in caplog.text
    assert (await checkpoints.latest("regrow")).checkpoint == stored, "the new head must not be blessed"


async def test_heads_are_signed_as_chains_grow_and_only_when_they_moved(app_db, tmp_path, caplog):
    await create_orgs(app_db, "grow")
    await write(app_db, "grow", 2)
    await write(app_db, None, 1)
    checkpoints = signer(tmp_path)
    first = {s.checkpoint.org_id: s for s in await checkpoints.take(app_db)}
    assert first["grow"].checkpoint.seq == 2 and None in first  # the platform chain too
    assert [s.checkpoint.org_id for s in await checkpoints.take(app_db)] == []  # nothing moved

    await write(app_db, "grow", 3)
    with caplog.at_level(logging.INFO, "agentbox.api.audit.checkpoint"):
        again = await checkpoints.take(app_db)
    assert [(s.checkpoint.org_id, s.checkpoint.seq) for s in again] == [("grow", 5)]
    report = await verify_chain(app_db, "grow", [first["grow"].checkpoint, again[0].checkpoint])
    assert report.ok and report.checkpoint.seq == 5
    # The log line carries the signed checkpoint itself: the history lives outside the database.
    line = next(r for r in caplog.records if r.getMessage() == "audit checkpoint")
    assert (line.chain, line.seq, line.checkpoint) == ("org:grow", 5, again[0].token)
    assert (tmp_path / "org-grow.jwt").read_text().strip() == again[0].token
    assert (tmp_path / "platform.jwt").exists()


async def test_a_stored_checkpoint_that_does_not_verify_is_never_signed_over(app_db, tmp_path, caplog):
    await create_orgs(app_db, "forged")
    await write(app_db, "forged", 2)
    mallory = signer(tmp_path)  # a key the API does not trust wrote the stored checkpoint
    await mallory.take(app_db)
    checkpoints = signer(tmp_path)
    with pytest.raises(CheckpointError, match="does not trust"):
        await checkpoints.latest("forged")
    with caplog.at_level(logging.ERROR, "agentbox.api.audit.checkpoint"):
        assert [s for s in await checkpoints.take(app_db) if s.checkpoint.org_id == "forged"] == []
    assert "not signed until the file is replaced or removed" in caplog.text


def test_a_checkpoint_is_a_jwt_anyone_with_the_public_key_can_check():
    key = Ed25519PrivateKey.generate()
    keys = CheckpointKeys(key)
    signed = keys.sign(Checkpoint("acme", 7, bytes(range(32)), SIGNED_AT))
    claims = jwt.decode(signed.token, key.public_key(), algorithms=["EdDSA"])  # no agentbox code needed
    assert (claims["sub"], claims["seq"], claims["hash"]) == ("org:acme", 7, bytes(range(32)).hex())
    verifier = CheckpointKeys(None, [load_public_key(public_key_text(key.public_key()))])
    assert verifier.verify(signed.token, "acme").checkpoint == signed.checkpoint


def test_a_checkpoint_from_a_signer_whose_clock_runs_ahead_still_verifies():
    keys = CheckpointKeys(Ed25519PrivateKey.generate())
    ahead = Checkpoint("acme", 3, bytes(32), datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=5))
    assert keys.verify(keys.sign(ahead).token, "acme").checkpoint == ahead


@pytest.mark.parametrize(("token", "org", "message"), [
    ("tampered", "acme", "Signature verification failed"),
    ("foreign", "acme", "does not trust"),
    ("signed", "globex", "another chain"),
    ("signed", None, "another chain"),
    ("login", "acme", "not an audit checkpoint"),
    ("garbage", "acme", "not a valid audit checkpoint"),
])
def test_only_a_trusted_signature_over_this_chain_is_accepted(token, org, message):
    key = Ed25519PrivateKey.generate()
    keys = CheckpointKeys(key)
    signed = keys.sign(Checkpoint("acme", 7, bytes(32), SIGNED_AT)).token
    header, payload, signature = signed.split(".")
    forged = base64.urlsafe_b64encode(
        base64.urlsafe_b64decode(payload + "==").replace(b'"seq":7', b'"seq":9')).decode().rstrip("=")
    tokens = {
        "signed": signed,
        "tampered": f"{header}.{forged}.{signature}",
        "foreign": CheckpointKeys(Ed25519PrivateKey.generate()).sign(
            Checkpoint("acme", 7, bytes(32), SIGNED_AT)).token,
        "login": jwt.encode({"sub": "org:acme"}, key, algorithm="EdDSA",
                            headers={"kid": next(iter(keys.trusted))}),
        "garbage": "not.a.token",
    }
    with pytest.raises(CheckpointError, match=message):
        keys.verify(tokens[token], org)


def test_signing_keys_load_from_pem_or_raw_base64_and_bad_ones_are_named_not_echoed():
    key = Ed25519PrivateKey.generate()
    raw = key.private_bytes_raw()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption()).decode()
    for text in (pem, base64.b64encode(raw).decode(), base64.urlsafe_b64encode(raw).decode().rstrip("=")):
        assert load_signing_key(text).private_bytes_raw() == raw
    secret = base64.b64encode(raw[:31]).decode()
    with pytest.raises(CheckpointError, match="Ed25519 private key") as caught:
        load_signing_key(secret)
    assert secret not in str(caught.value)
    rsa_pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()).decode()
    with pytest.raises(CheckpointError, match="not Ed25519"):
        load_signing_key(rsa_pem)


def test_settings_need_a_directory_for_a_signing_key_and_split_trusted_keys(monkeypatch, tmp_path):
    key = base64.b64encode(Ed25519PrivateKey.generate().private_bytes_raw()).decode()
    monkeypatch.setenv("AGENTBOX_AUDIT_CHECKPOINT_SIGNING_KEY", key)
    with pytest.raises(ValidationError, match="AGENTBOX_AUDIT_CHECKPOINT_DIR"):
        Settings()
    publics = [public_key_text(Ed25519PrivateKey.generate().public_key()) for _ in range(2)]
    monkeypatch.setenv("AGENTBOX_AUDIT_CHECKPOINT_DIR", str(tmp_path))
    monkeypatch.setenv("AGENTBOX_AUDIT_CHECKPOINT_TRUSTED_KEYS", ",".join(publics))
    keys = CheckpointKeys.from_settings(Settings())
    assert keys.signing is not None and len(keys.trusted) == 3

