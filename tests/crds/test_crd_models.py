"""The models reject what the CRD rejects, naming the field, and fill the same defaults."""

from datetime import timedelta

import pytest
from pydantic import ValidationError

from agentbox.crds.agentsession import AgentSession, AgentSessionSpec
from agentbox.crds.fields import parse_duration
from agentbox.crds.mcpserver import MCPServerSpec


def session_spec(**overrides):
    return {"tenant": {"org": "acme", "user": "Ada Lovelace <ada@example.com>"}, **overrides}


def test_defaults_match_the_contract():
    spec = AgentSessionSpec.model_validate(session_spec())
    assert spec.agent.runtime == "claude-code"
    assert spec.workspace.size == "1Gi" and spec.workspace.retain_on_delete is False
    assert spec.lifecycle.suspend is False and spec.mcp_servers == []
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["workspace"] == {"size": "1Gi", "retainOnDelete": False}
    assert "mcpServers" in dumped


def test_camel_case_and_snake_case_both_accepted():
    spec = AgentSessionSpec.model_validate(session_spec(mcpServers=[{"name": "github"}],
                                                        lifecycle={"idleTimeout": "30m"}))
    assert spec.mcp_servers[0].name == "github" and spec.lifecycle.idle_timeout == "30m"


@pytest.mark.parametrize(("overrides", "field"), [
    ({"tenant": {"org": "Acme", "user": "u"}}, "org"),
    ({"tenant": {"org": "a" * 57, "user": "u"}}, "org"),
    ({"tenant": {"org": "acme", "user": ""}}, "user"),
    ({"agent": {"runtime": "vim"}}, "runtime"),
    ({"agent": {"runtime": "custom"}}, "spec.agent.command"),
    ({"agent": {"env": [{"name": "AGENTBOX_RUNTIME", "value": "x"}]}}, "AGENTBOX_"),
    ({"agent": {"env": [{"name": "ANTHROPIC_API_KEY", "value": "sk-x"}]}}, "spec.egress.providerKey"),
    ({"agent": {"env": [{"name": "HTTPS_PROXY", "value": "http://x"}]}}, "spec.agent.env[].name"),
    ({"egress": {"allow": ["https://github.com"]}}, "allow"),
    ({"egress": {"allow": ["10.0.0.1"]}}, "spec.egress.allow"),
    ({"egress": {"provider": "mistral"}}, "provider"),
    ({"agent": {"runtime": "scripted"}, "egress": {"providerKey": {"name": "k", "key": "api-key"}}},
     "spec.egress.provider is required"),
    ({"workspace": {"size": "0Gi"}}, "size"),
    ({"workspace": {"size": "lots"}}, "size"),
    ({"lifecycle": {"idleTimeout": "1d"}}, "idleTimeout"),
    ({"lifecycle": {"shutdownTime": "tomorrow"}}, "shutdownTime"),
    ({"mcpServers": [{"name": "a"}, {"name": "a"}]}, "spec.mcpServers"),
    ({"mcpServers": [{"name": "Not_A_Label"}]}, "name"),
    ({"resources": {"limit": {"cpu": "1"}}}, "spec.resources"),
    ({"surprise": True}, "surprise"),
])
def test_invalid_session_specs_name_the_field(overrides, field):
    with pytest.raises(ValidationError) as error:
        AgentSessionSpec.model_validate(session_spec(**overrides))
    assert field in str(error.value)


@pytest.mark.parametrize(("spec", "field"), [
    ({"transport": "streamable-http"}, "spec.url is required"),
    ({"transport": "sse", "url": "https://x", "stdio": {"command": "npx"}}, "spec.stdio is only allowed"),
    ({"transport": "stdio", "url": "https://x", "stdio": {"command": "npx"}}, "spec.url is not allowed"),
    ({"transport": "stdio"}, "spec.stdio is required"),
    ({"url": "https://x"}, "transport"),
    ({"transport": "sse", "url": "ftp://x"}, "url"),
    ({"transport": "sse", "url": "https://x", "auth": {"type": "bearer"}}, "spec.auth.secretRef"),
    ({"transport": "sse", "url": "https://x", "headers": [{"name": "X-A"}]}, "spec.headers[]"),
    ({"transport": "sse", "url": "https://x",
      "headers": [{"name": "X-A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]},
     "spec.headers[]"),
    ({"transport": "sse", "url": "https://x", "timeout": "soon"}, "timeout"),
])
def test_invalid_mcpserver_specs_name_the_field(spec, field):
    with pytest.raises(ValidationError) as error:
        MCPServerSpec.model_validate(spec)
    assert field in str(error.value)


def test_valid_mcpservers():
    bearer = {"type": "bearer", "secretRef": {"name": "gh", "key": "token"}}
    http = MCPServerSpec.model_validate({"transport": "streamable-http", "url": "https://mcp.example.com/mcp",
                                         "auth": bearer})
    assert http.timeout == "30s" and http.auth.secret_ref.key == "token"
    stdio = MCPServerSpec.model_validate({"transport": "stdio", "stdio": {"command": "npx", "args": ["srv"]}})
    assert stdio.stdio.args == ["srv"] and stdio.url is None


@pytest.mark.parametrize(("text", "expected"), [
    ("30s", timedelta(seconds=30)), ("1h30m", timedelta(minutes=90)), ("1.5h", timedelta(minutes=90)),
    ("250ms", timedelta(milliseconds=250)),
])
def test_parse_duration(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "1d", "-5s", "5", "s", "1h 30m"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_whole_resource_round_trips():
    body = {"apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
            "metadata": {"name": "s1", "namespace": "tenant-acme", "uid": "123"},
            "spec": session_spec(), "status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "reason": "SessionReady"}]}}
    session = AgentSession.model_validate(body)
    assert session.status.phase == "Running"
    assert session.model_dump(by_alias=True, exclude_none=True)["metadata"]["uid"] == "123"


def test_stdio_env_from_names_are_unique_and_do_not_shadow_env():
    ref = {"name": "s", "key": "k"}
    ok = MCPServerSpec.model_validate({"transport": "stdio", "stdio": {
        "command": "x", "envFrom": [{"name": "TOKEN", "secretKeyRef": ref}]}})
    assert ok.stdio.env_from[0].secret_key_ref.name == "s"
    for stdio, field in [
        ({"command": "x", "envFrom": [{"name": "A", "secretKeyRef": ref}] * 2}, "unique"),
        ({"command": "x", "env": {"A": "1"}, "envFrom": [{"name": "A", "secretKeyRef": ref}]}, "both set A"),
        ({"command": "x", "envFrom": [{"name": "BAD-NAME", "secretKeyRef": ref}]}, "name"),
    ]:
        with pytest.raises(ValidationError, match=field):
            MCPServerSpec.model_validate({"transport": "stdio", "stdio": stdio})
