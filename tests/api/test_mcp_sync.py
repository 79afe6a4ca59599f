"""MCP configurations as pure logic: the MCPServer spec and Secret a row becomes, validation, sealing."""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest

from agentbox.api import mcp_sync
from agentbox.api.crypto import DecryptionError, KeyRing, generate_key_entry
from agentbox.api.mcp_sync import Configuration, Credentials, InvalidConfiguration

TOKEN = "ghp_" + "t" * 36
HEADER_SECRET = "header-secret-value-123"
ENV_SECRET = "env-secret-value-456"

HTTP = Configuration(id=uuid.uuid4(), org_id="acme", name="github", transport="streamable-http",
                     url="https://mcp.example.com/mcp", auth_type="bearer",
                     headers=[{"name": "X-Plain", "value": "visible"}], tools_allow=["search"],
                     tools_deny=["delete"], timeout_seconds=45)
HTTP_CREDENTIALS = Credentials(bearer_token=TOKEN, secret_headers={"X-Api-Key": HEADER_SECRET})
STDIO = Configuration(id=uuid.uuid4(), org_id="acme", name="files", transport="stdio", stdio_command="npx",
                      stdio_args=["-y", "server-files"])


def test_the_spec_references_credentials_and_the_secret_holds_them():
    spec = mcp_sync.check(HTTP, HTTP_CREDENTIALS).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert spec["auth"] == {"type": "bearer", "secretRef": {"name": "github", "key": "token"}}
    assert spec["headers"] == [
        {"name": "X-Plain", "value": "visible"},
        {"name": "X-Api-Key", "valueFrom": {"secretKeyRef": {"name": "github", "key": "header-x-api-key"}}}]
    assert spec["tools"] == {"allow": ["search"], "deny": ["delete"]} and spec["timeout"] == "45s"
    assert TOKEN not in json.dumps(spec) and HEADER_SECRET not in json.dumps(spec)
    assert mcp_sync.secret_data(HTTP_CREDENTIALS) == {"token": TOKEN, "header-x-api-key": HEADER_SECRET}
    assert mcp_sync.labels(HTTP) == {"agentbox.dev/org": "acme",
                                     "agentbox.dev/mcp-configuration": str(HTTP.id)}


def test_stdio_environment_goes_to_the_secret_only():
    credentials = Credentials(stdio_env={"API_KEY": ENV_SECRET})
    spec = mcp_sync.check(STDIO, credentials).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert spec["stdio"] == {"command": "npx", "args": ["-y", "server-files"], "env": {},
                             "envFrom": [{"name": "API_KEY", "secretKeyRef": {"name": STDIO.name,
                                                                              "key": "env-API_KEY"}}]}
    assert ENV_SECRET not in json.dumps(spec)
    assert mcp_sync.secret_data(credentials) == {"env-API_KEY": ENV_SECRET}


@pytest.mark.parametrize(("config", "credentials", "field"), [
    (HTTP, Credentials(), "bearerToken"),
    (replace(HTTP, auth_type="none"), HTTP_CREDENTIALS, "bearerToken"),
    (replace(HTTP, auth_type="none"), Credentials(stdio_env={"A": "b"}), "stdioEnv"),
    (replace(HTTP, auth_type="none", stdio_command="npx"), Credentials(), "stdio"),
    (replace(HTTP, auth_type="none", stdio_args=["-y"]), Credentials(), "stdio"),
    (STDIO, Credentials(secret_headers={"X": "y"}), "headers"),
    (replace(STDIO, auth_type="bearer"), Credentials(bearer_token="x"), "authType"),
    (replace(HTTP, timeout_seconds=0), HTTP_CREDENTIALS, "timeout"),
    # the CRD model's own rules across fields: named by the field their message leads with
    (replace(HTTP, url=None), HTTP_CREDENTIALS, "url"),
    (replace(STDIO, url="https://x.example"), Credentials(), "url"),
    (replace(HTTP, headers=[{"name": "x-api-key", "value": "dup"}]), HTTP_CREDENTIALS, "headers"),
])
def test_what_cannot_become_an_mcp_server_is_refused_by_field(config, credentials, field):
    with pytest.raises(InvalidConfiguration) as caught:
        mcp_sync.check(config, credentials)
    assert caught.value.field == field
    assert "spec." not in caught.value.message  # worded in the API's terms


def test_a_put_body_may_leave_the_stored_token_in_place():
    assert mcp_sync.check(HTTP, Credentials(), token_required=False).auth.type == "bearer"


def test_credentials_seal_per_row_and_column_and_never_print():
    keys = KeyRing.parse([generate_key_entry("k1")])
    credentials = Credentials(bearer_token=TOKEN, secret_headers={"X-Api-Key": HEADER_SECRET},
                              stdio_env={"A": ENV_SECRET})
    sealed = mcp_sync.seal(keys, HTTP, credentials)
    assert all(value.startswith("v1:k1:") for value in sealed.values())
    assert not any(TOKEN in value or HEADER_SECRET in value for value in sealed.values())
    assert mcp_sync.unseal(keys, HTTP, sealed) == credentials
    with pytest.raises(DecryptionError):  # the same ciphertext on another row
        mcp_sync.unseal(keys, replace(HTTP, id=uuid.uuid4()), sealed)
    swapped = {**sealed, mcp_sync.BEARER_COLUMN: sealed[mcp_sync.HEADERS_COLUMN]}
    with pytest.raises(DecryptionError):  # or in another column
        mcp_sync.unseal(keys, HTTP, swapped)
    assert TOKEN not in repr(credentials) and ENV_SECRET not in repr(credentials)


def test_no_key_ring_is_fine_without_credentials_and_refused_with_them():
    empty = mcp_sync.seal(None, STDIO, Credentials())
    assert empty == {mcp_sync.BEARER_COLUMN: None, mcp_sync.HEADERS_COLUMN: None, mcp_sync.ENV_COLUMN: None}
    assert mcp_sync.unseal(None, STDIO, empty) == Credentials()
    with pytest.raises(ValueError, match="key ring"):
        mcp_sync.seal(None, HTTP, HTTP_CREDENTIALS)


def _server(config_id, phase=None, generation=1, observed=1, annotations=None, conditions=()):
    return {"metadata": {"labels": {"agentbox.dev/mcp-configuration": str(config_id)},
                         "generation": generation, "annotations": annotations or {}},
            "status": {"phase": phase, "observedGeneration": observed, "conditions": list(conditions)}}


def test_the_status_answered_is_the_operators_verdict_on_the_current_spec():
    status = mcp_sync.configuration_status
    ready = {"type": "Ready", "status": "False", "message": "connection refused"}
    assert status("pending", None, HTTP.id, None) == ("pending", None)
    assert status("pending", None, HTTP.id, _server(HTTP.id, "Ready")) == ("ready", None)
    assert status("pending", None, HTTP.id, _server(HTTP.id, "Unreachable", conditions=[ready])) == (
        "unreachable", "connection refused")
    assert status("pending", None, HTTP.id, _server(HTTP.id, "Invalid"))[0] == "invalid"
    assert status("pending", None, HTTP.id, _server(HTTP.id, "Ready", generation=2))[0] == "pending"
    assert status("pending", None, HTTP.id, _server(uuid.uuid4(), "Ready")) == ("pending", None)  # not ours
    marked = _server(HTTP.id, "Ready", annotations={"agentbox.dev/oauth": "needs-reauth"})
    assert status("pending", None, HTTP.id, marked)[0] == "needs-reauth"
    stored = status("needs-reauth", "refused", HTTP.id, _server(HTTP.id, "Ready"))
    assert stored == ("needs-reauth", "refused")
