"""AES-256-GCM credential encryption (security.md, "Encryption of stored credentials"): pure, no I/O."""

import base64

import pytest
from pydantic import SecretStr

from agentbox.api.crypto import CipherContext, DecryptionError, KeyConfigError, KeyRing, generate_key_entry

WHERE = CipherContext(org_id="acme", table="mcp_configurations", row_id="7f1c", column="bearer_token_enc")


def test_round_trip_and_format_carries_the_key_id():
    keys = KeyRing.parse([generate_key_entry("k2026")])
    stored = keys.encrypt("ghp_secret_value", WHERE)
    assert stored.startswith("v1:k2026:")
    assert "ghp_secret_value" not in stored
    assert keys.decrypt_text(stored, WHERE) == "ghp_secret_value"


def test_ten_thousand_encryptions_use_ten_thousand_distinct_nonces():
    keys = KeyRing.parse([generate_key_entry("k1")])
    nonces = set()
    for _ in range(10_000):
        payload = keys.encrypt(b"same plaintext", WHERE).split(":")[2]
        blob = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        nonces.add(blob[:12])
    assert len(nonces) == 10_000


@pytest.mark.parametrize("moved", [
    CipherContext("other-org", WHERE.table, WHERE.row_id, WHERE.column),
    CipherContext(WHERE.org_id, WHERE.table, "another-row", WHERE.column),
    CipherContext(WHERE.org_id, WHERE.table, WHERE.row_id, "secret_headers_enc"),
    CipherContext(WHERE.org_id, "mcp_oauth_tokens", WHERE.row_id, WHERE.column),
], ids=["org", "row", "column", "table"])
def test_a_ciphertext_moved_elsewhere_fails_to_decrypt(moved):
    keys = KeyRing.parse([generate_key_entry("k1")])
    stored = keys.encrypt(b"token", WHERE)
    with pytest.raises(DecryptionError, match="moved from another row"):
        keys.decrypt(stored, moved)


def test_the_key_id_is_bound_too_relabelling_the_ciphertext_fails():
    old = generate_key_entry("old")
    # The same key material under two ids: only the associated data tells them apart.
    same_key_twice = KeyRing.parse([old, "new:" + old.split(":", 1)[1]])
    stored = same_key_twice.encrypt(b"token", WHERE)  # sealed under "old"
    relabelled = stored.replace("v1:old:", "v1:new:")
    with pytest.raises(DecryptionError):
        same_key_twice.decrypt(relabelled, WHERE)


def test_rotation_old_keys_decrypt_new_writes_use_the_primary():
    old_entry, new_entry = generate_key_entry("2025"), generate_key_entry("2026")
    before = KeyRing.parse([old_entry])
    stored_before = before.encrypt(b"old secret", WHERE)

    after = KeyRing.parse(f"{new_entry},{old_entry}")  # the comma-separated form of the setting
    assert after.primary == "2026"
    assert after.decrypt(stored_before, WHERE) == b"old secret"
    assert after.needs_rotation(stored_before)
    stored_after = after.encrypt(b"new secret", WHERE)
    assert stored_after.startswith("v1:2026:")
    assert not after.needs_rotation(stored_after)
    with pytest.raises(DecryptionError, match="unknown key id '2026'"):
        before.decrypt(stored_after, WHERE)


def test_tampering_is_detected():
    keys = KeyRing.parse([generate_key_entry("k1")])
    stored = keys.encrypt(b"token", WHERE)
    flipped = stored[:-2] + ("A" if stored[-2] != "A" else "B") + stored[-1]
    for bad in (flipped, stored[:20], "v2" + stored[2:], "plaintext", "v1:k1:%%%"):
        with pytest.raises(DecryptionError):
            keys.decrypt(bad, WHERE)


def test_secret_str_entries_from_settings_are_accepted():
    keys = KeyRing.parse([SecretStr(generate_key_entry("k1"))])
    assert keys.key_ids == ["k1"]


@pytest.mark.parametrize(("entries", "message"), [
    ([], "no encryption keys"),
    (["nocolon"], "#1 must look like key-id:base64"),
    (["bad id:" + base64.b64encode(bytes(32)).decode()], "#1: key id must match"),
    (["k1:not*base64"], r"#1 \(k1\): not valid base64"),
    (["k1:" + base64.b64encode(bytes(16)).decode()], r"#1 \(k1\): decodes to 16 bytes"),
    ([generate_key_entry("k1"), generate_key_entry("k1")], "#2: key id 'k1' appears twice"),
])
def test_bad_key_lists_name_the_entry_and_never_the_key(entries, message):
    with pytest.raises(KeyConfigError, match=message) as caught:
        KeyRing.parse(entries)
    for entry in entries:
        secret = entry.partition(":")[2]
        assert not secret or secret not in str(caught.value)
