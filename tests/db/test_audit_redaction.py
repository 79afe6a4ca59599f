"""No token or key ever reaches the audit log: the redaction applied to every row (pure)."""

from agentbox.api.audit import REDACTED, redact, scrub

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1MSJ9.c2lnbmF0dXJlLWhlcmU"


def test_secret_named_keys_are_replaced_at_any_depth():
    details = {
        "name": "github",
        "token": "abc", "access_token": "abc", "refresh_token": "abc", "client_secret": "abc",
        "password": "abc", "Authorization": "abc", "api_key": "abc", "X-Api-Key": "abc",
        "code_verifier": "abc", "code": "abc", "headers": [{"name": "X-Api-Key", "api_key": "abc"}],
        "nested": {"deeper": {"privateKey": "abc", "count": 3}},
    }
    cleaned = redact(details)
    assert cleaned["name"] == "github"
    for key in ("token", "access_token", "refresh_token", "client_secret", "password", "Authorization",
                "api_key", "X-Api-Key", "code_verifier", "code"):
        assert cleaned[key] == REDACTED, key
    assert cleaned["headers"] == [{"name": "X-Api-Key", "api_key": REDACTED}]
    assert cleaned["nested"] == {"deeper": {"privateKey": REDACTED, "count": 3}}
    assert details["token"] == "abc"  # the caller's dict is untouched


def test_secret_shaped_values_are_scrubbed_under_innocent_keys():
    cases = [
        f"header was Bearer {JWT}",
        JWT,
        "v1:k2026:" + "A" * 40,
        "ghp_" + "a" * 36,
        "sk-" + "b" * 40,
        "postgresql://agentbox_app:hunter2@db:5432/agentbox",
    ]
    for text in cases:
        cleaned = scrub(text)
        assert REDACTED in cleaned, text
        for secret in (JWT, "hunter2", "A" * 40, "a" * 36, "b" * 40):
            assert secret not in cleaned
    assert scrub("postgresql://agentbox_app:hunter2@db:5432/agentbox") == f"postgresql://{REDACTED}@db:5432/agentbox"


def test_ordinary_values_pass_unchanged():
    details = {"name": "github", "transport": "sse", "url": "https://mcp.example.com/sse", "tools": ["a"],
               "count": 2, "enabled": True, "key_id": "k2026", "auth_type": "bearer"}
    assert redact(details) == details
