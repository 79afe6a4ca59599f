"""AES-256-GCM encryption of stored credentials, with key rotation.

    keys = KeyRing.parse(settings.encryption_keys)     # ["2026-11:<base64 of 32 bytes>", "2026-01:..."]
    where = CipherContext(org_id="acme", table="mcp_configurations", row_id=str(row_id),
                          column="bearer_token_enc")
    stored = keys.encrypt(b"ghp_...", where)            # "v1:2026-11:<base64url(nonce | ciphertext | tag)>"
    keys.decrypt(stored, where)                        # b"ghp_..."

The first key encrypts; every key decrypts, chosen by the key id the ciphertext carries. Each encryption
draws a fresh 12-byte nonce. The associated data binds the ciphertext to (org, table, row id, column,
key id): copied to another row, column or org, it no longer decrypts.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

FORMAT_VERSION = "v1"
NONCE_BYTES = 12
KEY_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class KeyConfigError(ValueError):
    """The key list is malformed. Messages name the entry by position and key id, never the key."""


class DecryptionError(Exception):
    """A ciphertext is malformed, under an unknown key, tampered with, or not bound to this place."""


@dataclass(frozen=True)
class CipherContext:
    """Where a ciphertext lives; all of it goes into the associated data."""

    org_id: str
    table: str
    row_id: str
    column: str

    def associated_data(self, key_id: str) -> bytes:
        # A JSON array is unambiguous where plain concatenation is not ("a|b" + "c" vs "a" + "b|c").
        return json.dumps([FORMAT_VERSION, self.org_id, self.table, self.row_id, self.column, key_id],
                          separators=(",", ":")).encode()


class KeyRing:
    """Named AES-256 keys: the primary (first) encrypts, all decrypt."""

    def __init__(self, keys: dict[str, bytes], primary: str) -> None:
        if primary not in keys:
            raise KeyConfigError(f"primary key id {primary!r} is not among the keys")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.primary = primary

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    @classmethod
    def parse(cls, entries: str | Iterable[object]) -> KeyRing:
        """From `key-id:base64-32-bytes` entries: a list (str or pydantic SecretStr), or one comma-separated
        string. The first entry is the primary."""
        if isinstance(entries, str):
            entries = [part for part in entries.split(",") if part.strip()]
        keys: dict[str, bytes] = {}
        for position, entry in enumerate(entries, start=1):
            text = entry.get_secret_value() if hasattr(entry, "get_secret_value") else entry
            if not isinstance(text, str) or ":" not in text:
                raise KeyConfigError(f"encryption key #{position} must look like key-id:base64-32-bytes")
            key_id, _, encoded = text.strip().partition(":")
            if not KEY_ID.match(key_id):
                raise KeyConfigError(f"encryption key #{position}: key id must match {KEY_ID.pattern}")
            if key_id in keys:
                raise KeyConfigError(f"encryption key #{position}: key id {key_id!r} appears twice")
            try:
                key = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise KeyConfigError(f"encryption key #{position} ({key_id}): not valid base64") from None
            if len(key) != 32:
                raise KeyConfigError(
                    f"encryption key #{position} ({key_id}): decodes to {len(key)} bytes, AES-256 needs 32")
            keys[key_id] = key
        if not keys:
            raise KeyConfigError("no encryption keys configured (AGENTBOX_ENCRYPTION_KEYS)")
        return cls(keys, primary=next(iter(keys)))

    def encrypt(self, plaintext: bytes | str, where: CipherContext) -> str:
        data = plaintext.encode() if isinstance(plaintext, str) else plaintext
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.primary].encrypt(nonce, data, where.associated_data(self.primary))
        payload = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{FORMAT_VERSION}:{self.primary}:{payload}"

    def decrypt(self, stored: str, where: CipherContext) -> bytes:
        _, key_id, payload = _split(stored)
        field = f"{where.table}.{where.column}"
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise DecryptionError(f"ciphertext for {field} uses unknown key id {key_id!r}")
        try:
            blob = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        except (binascii.Error, ValueError):
            raise DecryptionError(f"ciphertext for {field} is not valid base64") from None
        if len(blob) < NONCE_BYTES + 16:
            raise DecryptionError(f"ciphertext for {field} is truncated")
        try:
            return cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], where.associated_data(key_id))
        except InvalidTag:
            raise DecryptionError(
                f"ciphertext for {field} failed authentication: tampered with, or "
                "moved from another row, column or org") from None

    def decrypt_text(self, stored: str, where: CipherContext) -> str:
        return self.decrypt(stored, where).decode()

    def needs_rotation(self, stored: str) -> bool:
        """True when `stored` was sealed with a key other than the primary (re-encrypt it)."""
        return _split(stored)[1] != self.primary


def _split(stored: str) -> tuple[str, str, str]:
    parts = stored.split(":") if isinstance(stored, str) else []
    if len(parts) != 3 or parts[0] != FORMAT_VERSION:
        raise DecryptionError(f"not an agentbox ciphertext (expected {FORMAT_VERSION}:<key id>:<data>)")
    return parts[0], parts[1], parts[2]


def generate_key_entry(key_id: str) -> str:
    """A fresh `key-id:base64` entry for AGENTBOX_ENCRYPTION_KEYS."""
    if not KEY_ID.match(key_id):
        raise KeyConfigError(f"key id must match {KEY_ID.pattern}")
    return f"{key_id}:{base64.b64encode(AESGCM.generate_key(bit_length=256)).decode()}"
