"""Signed checkpoints of the audit chains: an anchor that whoever controls PostgreSQL cannot move.

The hash chain (migrations/0004_audit.sql) shows a row edited or removed in the middle, but a database
superuser can still rewind a chain: delete its newest rows and move its recorded head back, and what is
left verifies. So the API signs every chain's head (org, seq, hash, time) now and then with an Ed25519
key the database never sees, and keeps the signature out of the database's reach:

- in the API's own log, one structured line per new checkpoint (logger `agentbox.api.audit.checkpoint`,
  field `checkpoint`): the log pipeline keeps the whole history, away from the database and the pod;
- as the latest checkpoint of each chain, one file per chain in AGENTBOX_AUDIT_CHECKPOINT_DIR (a volume of
  the API's pod), which the verifier holds the chain to and GET /api/v1/audit/checkpoint serves, so an
  org can keep its own copies and hand one back to GET /api/v1/audit/verify?checkpoint=... later.

Not a ConfigMap: the API would need write access to ConfigMaps (its RBAC has none), and a write to etcd
per chain per interval buys nothing the log does not already keep.

A checkpoint is a JWT (RFC 7519) signed with EdDSA, so anyone holding the public key can check one with
any JWT library; verification needs nothing else. Only the latest checkpoint of a chain is needed: the
chain links every earlier row to it. A chain's new head is signed only while the chain still holds its
previous checkpoint, so a chain that was cut short and has grown again past it is reported (logged as an
error, and by the verifier) instead of being laundered by a fresh signature.

    checkpoints = Checkpoints.from_settings(settings)
    await checkpoints.take(db)                          # one pass: sign the heads that moved
    stored = await checkpoints.latest(org_id)           # the stored one, its signature checked
    report = await audit.verify_chain(db, org_id, [stored.checkpoint] if stored else [])
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agentbox.api import audit
from agentbox.api.db import Database
from agentbox.api.settings import Settings

log = logging.getLogger("agentbox.api.audit.checkpoint")

CHECKPOINT_TYPE = "agentbox-audit-checkpoint+jwt"
ISSUER = "agentbox-audit"
PLATFORM_SUBJECT = "platform"
ORG_SUBJECT_PREFIX = "org:"


class CheckpointError(ValueError):
    """A key or checkpoint that cannot be used or trusted; the message says why, never the key."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """A public key's fingerprint (the JWT `kid`): the first 8 bytes of the SHA-256 of its raw form."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()[:16]


def public_key_text(public_key: Ed25519PublicKey) -> str:
    """The form AGENTBOX_AUDIT_CHECKPOINT_TRUSTED_KEYS takes: base64 of the raw 32 bytes."""
    return base64.b64encode(public_key.public_bytes_raw()).decode()


def load_signing_key(text: str) -> Ed25519PrivateKey:
    """An Ed25519 private key as PEM (PKCS #8, what `openssl genpkey -algorithm ed25519` and Helm's
    genPrivateKey "ed25519" give) or as base64 of its raw 32 bytes."""
    text = text.strip()
    try:
        if text.startswith("-----BEGIN"):
            key = serialization.load_pem_private_key(text.encode(), password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(_raw32(text))
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise CheckpointError("the audit checkpoint signing key must be an Ed25519 private key: PEM "
                              "(PKCS #8) or base64 of 32 bytes") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise CheckpointError(f"the audit checkpoint signing key is {type(key).__name__}, not Ed25519")
    return key


def load_public_key(text: str) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(_raw32(text.strip()))
    except ValueError as exc:
        raise CheckpointError(f"trusted audit checkpoint key {text.strip()[:12]!r}...: must be base64 of "
                              "a 32-byte Ed25519 public key") from exc


def _raw32(text: str) -> bytes:
    try:  # standard or URL-safe alphabet, padded or not
        raw = base64.b64decode(text.translate(str.maketrans("-_", "+/")) + "=" * (-len(text) % 4),
                               validate=True)
    except binascii.Error as exc:
        raise ValueError("not base64") from exc
    if len(raw) != 32:
        raise ValueError("not 32 bytes")
    return raw


def _subject(org_id: str | None) -> str:
    return PLATFORM_SUBJECT if org_id is None else ORG_SUBJECT_PREFIX + org_id


def _chain_name(org_id: str | None) -> str:
    return "the platform chain" if org_id is None else f"org {org_id!r}"


@dataclass(frozen=True)
class SignedCheckpoint:
    checkpoint: audit.Checkpoint
    token: str
    key_id: str


class CheckpointKeys:
    """The signing key (if this API signs) and every public key a checkpoint may be signed with: the
    signing key's own and those listed as trusted (keys rotated out, or a verifier that never signs)."""

    def __init__(self, signing: Ed25519PrivateKey | None, trusted: Iterable[Ed25519PublicKey] = ()) -> None:
        self.signing = signing
        publics = [*trusted, *([signing.public_key()] if signing is not None else [])]
        self.trusted = {key_id(public): public for public in publics}

    @classmethod
    def from_settings(cls, settings: Settings) -> CheckpointKeys:
        signing = settings.audit_checkpoint_signing_key
        return cls(load_signing_key(signing.get_secret_value()) if signing is not None else None,
                   [load_public_key(text) for text in settings.audit_checkpoint_trusted_keys])

    def sign(self, checkpoint: audit.Checkpoint) -> SignedCheckpoint:
        if self.signing is None:
            raise CheckpointError("no audit checkpoint signing key is configured")
        kid = key_id(self.signing.public_key())
        claims = {"iss": ISSUER, "sub": _subject(checkpoint.org_id), "seq": checkpoint.seq,
                  "hash": checkpoint.hash.hex(), "iat": int(checkpoint.at.timestamp())}
        token = jwt.encode(claims, self.signing, algorithm="EdDSA",
                           headers={"typ": CHECKPOINT_TYPE, "kid": kid})
        return SignedCheckpoint(checkpoint, token, kid)

    def verify(self, token: str, org_id: str | None) -> SignedCheckpoint:
        """The checkpoint `token` carries, if a trusted key signed it and it is of `org_id`'s chain."""
        try:
            header = jwt.get_unverified_header(token)
            public = self.trusted.get(header.get("kid", ""))
            if header.get("typ") != CHECKPOINT_TYPE:
                raise CheckpointError("not an audit checkpoint")
            if public is None:
                raise CheckpointError("signed by a key this API does not trust")
            # `iat` says when the head was signed, not from when the checkpoint is valid: a replica whose
            # clock runs behind the signer's must not refuse a fresh one.
            claims: dict[str, Any] = jwt.decode(token, public, algorithms=["EdDSA"], issuer=ISSUER,
                                                options={"require": ["iss", "sub", "seq", "hash", "iat"],
                                                         "verify_iat": False})
        except jwt.PyJWTError as exc:
            raise CheckpointError(f"not a valid audit checkpoint: {exc}") from exc
        if claims["sub"] != _subject(org_id):
            raise CheckpointError(f"a checkpoint of another chain, not of {_chain_name(org_id)}")
        seq, digest = claims["seq"], claims["hash"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1 or not isinstance(digest, str):
            raise CheckpointError("not a valid audit checkpoint: seq or hash malformed")
        try:
            hash_bytes = bytes.fromhex(digest)
        except ValueError as exc:
            raise CheckpointError("not a valid audit checkpoint: hash is not hex") from exc
        signed_at = datetime.fromtimestamp(claims["iat"], UTC)
        return SignedCheckpoint(audit.Checkpoint(org_id, seq, hash_bytes, signed_at), token, header["kid"])


class CheckpointStore:
    """The latest checkpoint of each chain, one file per chain (`org-<id>.jwt`, `platform.jwt`; org ids are
    DNS labels, so names never clash), replaced atomically. Files are read and written off the event loop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, org_id: str | None) -> Path:
        return self.directory / ("platform.jwt" if org_id is None else f"org-{org_id}.jwt")

    async def read(self, org_id: str | None) -> str | None:
        def read() -> str | None:
            try:
                return self._path(org_id).read_text().strip() or None
            except FileNotFoundError:
                return None
        return await asyncio.to_thread(read)

    async def write(self, org_id: str | None, token: str) -> None:
        def write() -> None:
            self.directory.mkdir(parents=True, exist_ok=True)
            path = self._path(org_id)
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            partial.write_text(token + "\n")
            partial.replace(path)
        await asyncio.to_thread(write)


class Checkpoints:
    """Signing, keeping and trusting checkpoints, as configured: a signing key and a store (the settings
    ask for both or for no key), or trusted keys alone (a verifier of checkpoints handed to it), or none."""

    def __init__(self, keys: CheckpointKeys, store: CheckpointStore | None) -> None:
        self.keys = keys
        self.store = store

    @classmethod
    def from_settings(cls, settings: Settings) -> Checkpoints:
        directory = settings.audit_checkpoint_dir
        return cls(CheckpointKeys.from_settings(settings),
                   CheckpointStore(directory) if directory is not None else None)

    @property
    def signing(self) -> bool:
        return self.keys.signing is not None

    async def latest(self, org_id: str | None) -> SignedCheckpoint | None:
        """The stored checkpoint of the chain, None if there is none yet. CheckpointError if the stored one
        does not verify: the store was tampered with, or its key is no longer trusted."""
        token = await self.store.read(org_id) if self.store is not None else None
        if token is None:
            return None
        try:
            return self.keys.verify(token, org_id)
        except CheckpointError as exc:
            raise CheckpointError(f"the stored checkpoint of {_chain_name(org_id)}: {exc}") from exc

    async def take(self, db: Database) -> list[SignedCheckpoint]:
        """One pass: sign the head of every chain that moved since its stored checkpoint, as long as the
        chain still holds that checkpoint. Returns what was signed."""
        if self.store is None:
            raise CheckpointError("taking audit checkpoints needs a directory to keep them in")
        signed: list[SignedCheckpoint] = []
        now = datetime.now(UTC).replace(microsecond=0)
        for head in await audit.chain_heads(db):
            try:
                stored = await self.latest(head.org_id)
            except CheckpointError as exc:  # never signed over: that would bless whatever the chain is now
                log.error("%s; its head is not signed until the file is replaced or removed", exc)
                continue
            previous = stored.checkpoint if stored is not None else None
            if previous is not None and (previous.seq, previous.hash) == (head.seq, head.hash):
                continue
            if previous is not None and not await audit.still_holds(db, previous):
                log.error("the audit chain of %s no longer holds its checkpoint: its head is not signed",
                          _chain_name(head.org_id),
                          extra={"chain": _subject(head.org_id), "checkpoint_seq": previous.seq,
                                 "checkpoint_at": previous.at.isoformat(), "head_seq": head.seq})
                continue
            checkpoint = self.keys.sign(audit.Checkpoint(head.org_id, head.seq, head.hash, now))
            await self.store.write(head.org_id, checkpoint.token)
            log.info("audit checkpoint", extra={
                "chain": _subject(head.org_id), "seq": head.seq, "hash": head.hash.hex(),
                "signed_at": now.isoformat(), "key_id": checkpoint.key_id, "checkpoint": checkpoint.token})
            signed.append(checkpoint)
        return signed
