"""MCPServer (agentbox.dev/v1alpha1): an MCP server that sessions in the namespace may reference.

The same models validate the API's request bodies and generate the CRD schema (`make crds`).
"""

import re
from datetime import datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from agentbox.crds.conditions import MCPServerPhase
from agentbox.crds.fields import (
    Condition,
    DnsSubdomain,
    Duration,
    KubeModel,
    ToolFilter,
)

GROUP = "agentbox.dev"
VERSION = "v1alpha1"
KIND = "MCPServer"
PLURAL = "mcpservers"
API_VERSION = f"{GROUP}/{VERSION}"

Transport = Literal["streamable-http", "sse", "stdio"]
SecretKey = Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z0-9]+$", min_length=1, max_length=253)]

# A header name is an HTTP token (RFC 9110 section 5.1). A value is visible ASCII, space and tab: no CR
# or LF (they would end the header and start another), no other control character, nothing the HTTP
# clients could not encode as ASCII.
HEADER_NAME_PATTERN = r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$"
HEADER_VALUE_PATTERN = r"^[\t\x20-\x7e]*$"
# Header names a configuration may not set (case-insensitive), because the HTTP client owns them or they
# steer the connection rather than the request: message framing (Content-Length, Transfer-Encoding: a
# request smuggling risk), hop-by-hop and connection control (Connection, Keep-Alive, TE, Trailer,
# Upgrade, Expect), the target virtual host (Host), anything meant for a proxy (Proxy-*), and
# Authorization, which `auth` sets. Cookie and other end-to-end headers are allowed.
RESERVED_HEADER_NAMES = ("authorization", "connection", "content-length", "expect", "host", "keep-alive",
                         "te", "trailer", "transfer-encoding", "upgrade")
RESERVED_HEADER_PREFIX = "proxy-"
RESERVED_HEADER_MESSAGE = (f"is reserved: the HTTP client or auth sets {', '.join(RESERVED_HEADER_NAMES)} "
                           f"and {RESERVED_HEADER_PREFIX}* headers")
_RESERVED_HEADER_RULE = (f"!(self.lowerAscii() in {list(RESERVED_HEADER_NAMES)}) && "
                         f"!self.lowerAscii().startsWith('{RESERVED_HEADER_PREFIX}')")


def not_reserved_header(name: str) -> str:
    lowered = name.lower()
    if lowered in RESERVED_HEADER_NAMES or lowered.startswith(RESERVED_HEADER_PREFIX):
        raise ValueError(f"header {name!r} {RESERVED_HEADER_MESSAGE}")
    return name


def _header_name(name: str) -> str:
    if not re.fullmatch(HEADER_NAME_PATTERN, name):
        raise ValueError(f"{name!r} is not an HTTP header name (a token: letters, digits and "
                         "!#$%&'*+-.^_`|~, nothing else)")
    return not_reserved_header(name)


def _header_value(value: str) -> str:
    for position, character in enumerate(value):
        if not (character == "\t" or " " <= character <= "~"):
            raise ValueError(f"contains U+{ord(character):04X} at position {position}: a header value is "
                             "visible ASCII, space and tab only (no CR, LF or other control characters)")
    return value


# The patterns and the rule are for the schemas (the CRD's, the API's OpenAPI); the validators check the
# same with messages that say what is wrong.
HeaderName = Annotated[str, StringConstraints(min_length=1, max_length=128), AfterValidator(_header_name),
                       Field(json_schema_extra={"pattern": HEADER_NAME_PATTERN, "x-kubernetes-validations": [
                           {"rule": _RESERVED_HEADER_RULE,
                            "message": f"spec.headers[].name {RESERVED_HEADER_MESSAGE}"}]})]
HeaderValue = Annotated[str, StringConstraints(max_length=8192), AfterValidator(_header_value),
                        Field(json_schema_extra={"pattern": HEADER_VALUE_PATTERN})]


class SecretKeySelector(KubeModel):
    """One key of a Secret in the same namespace."""

    name: DnsSubdomain = Field(description="Name of the Secret.")
    key: SecretKey = Field(description="Key within the Secret.")


EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", min_length=1, max_length=256)]


class SecretEnvVar(KubeModel):
    """An environment variable of a stdio server whose value is a Secret key (an API key, a token)."""

    name: EnvName = Field(description="Variable name, e.g. GITHUB_TOKEN.")
    secret_key_ref: SecretKeySelector = Field(description="The Secret key (same namespace) with the value.")


class Stdio(KubeModel):
    """A server started as a child process of the session's MCP gateway."""

    command: Annotated[str, StringConstraints(min_length=1, max_length=1024)] = Field(
        description="Executable, e.g. npx.")
    args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=list, max_length=64, description="Arguments.")
    env: dict[str, Annotated[str, StringConstraints(max_length=32768)]] = Field(
        default_factory=dict, description="Environment of the process, literal (no secrets: use envFrom).")
    env_from: list[SecretEnvVar] = Field(
        default_factory=list, max_length=64,
        description="Environment variables read from Secrets; only the gateway container sees them.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})

    @model_validator(mode="after")
    def _distinct_names(self) -> "Stdio":
        names = [var.name for var in self.env_from]
        if len(names) != len(set(names)):
            raise ValueError("spec.stdio.envFrom names must be unique")
        if clash := sorted({var.name for var in self.env_from} & set(self.env)):
            raise ValueError(f"spec.stdio.envFrom and spec.stdio.env both set {', '.join(clash)}")
        return self


class Auth(KubeModel):
    """How the gateway authenticates to the server."""

    model_config = KubeModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [
        {"rule": "!has(self.type) || self.type == 'none' || has(self.secretRef)",
         "message": "spec.auth.secretRef is required when spec.auth.type is bearer or oauth"}]}}

    type: Literal["none", "bearer", "oauth"] = Field("none", description="none, bearer or oauth.")
    secret_ref: SecretKeySelector | None = Field(None, description="The Secret key holding the token.")

    @model_validator(mode="after")
    def _secret_for_tokens(self) -> "Auth":
        if self.type != "none" and self.secret_ref is None:
            raise ValueError("spec.auth.secretRef is required when spec.auth.type is bearer or oauth")
        return self


class HeaderSource(KubeModel):
    """Where a header's value comes from."""

    secret_key_ref: SecretKeySelector = Field(description="A Secret key in the same namespace.")


class Header(KubeModel):
    """An HTTP header sent to the server, from a literal value or a Secret."""

    model_config = KubeModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [
        {"rule": "has(self.value) != has(self.valueFrom)",
         "message": "spec.headers[] needs exactly one of value and valueFrom"}]}}

    name: HeaderName = Field(description="Header name, e.g. X-Api-Key.")
    value: HeaderValue | None = Field(None, description="A literal (non-secret) value.")
    value_from: HeaderSource | None = Field(None, description="A value read from a Secret.")

    @model_validator(mode="after")
    def _one_source(self) -> "Header":
        if (self.value is None) == (self.value_from is None):
            raise ValueError("spec.headers[] needs exactly one of value and valueFrom")
        return self


class MCPServerSpec(KubeModel):
    """The desired MCP server: how to reach it and which of its tools to expose."""

    model_config = KubeModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [
        {"rule": "self.transport == 'stdio' || has(self.url)",
         "message": "spec.url is required when spec.transport is streamable-http or sse",
         "fieldPath": ".url", "reason": "FieldValueRequired"},
        {"rule": "self.transport != 'stdio' || !has(self.url)",
         "message": "spec.url is not allowed when spec.transport is stdio",
         "fieldPath": ".url", "reason": "FieldValueForbidden"},
        {"rule": "self.transport != 'stdio' || has(self.stdio)",
         "message": "spec.stdio is required when spec.transport is stdio",
         "fieldPath": ".stdio", "reason": "FieldValueRequired"},
        {"rule": "self.transport == 'stdio' || !has(self.stdio)",
         "message": "spec.stdio is only allowed when spec.transport is stdio",
         "fieldPath": ".stdio", "reason": "FieldValueForbidden"}]}}

    description: Annotated[str, StringConstraints(max_length=1024)] = Field("", description="What it offers.")
    transport: Transport = Field(description="streamable-http, sse or stdio.")
    url: Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)] | None = Field(
        None, description="Endpoint of a streamable-http or sse server.")
    stdio: Stdio | None = Field(None, description="Process of a stdio server.")
    auth: Auth = Field(default_factory=Auth, description="Authentication to the server.",
                       json_schema_extra={"default": {}})
    headers: list[Header] = Field(
        default_factory=list, max_length=32, description="Extra HTTP headers (http and sse only).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    tools: ToolFilter = Field(default_factory=ToolFilter, description="Tools to expose.",
                              json_schema_extra={"default": {}})
    timeout: Duration = Field("30s", description="Connect and call timeout, e.g. 30s.")

    @model_validator(mode="after")
    def _transport_fields(self) -> "MCPServerSpec":
        if self.transport == "stdio":
            if self.url is not None:
                raise ValueError("spec.url is not allowed when spec.transport is stdio")
            if self.stdio is None:
                raise ValueError("spec.stdio is required when spec.transport is stdio")
        else:
            if self.url is None:
                raise ValueError("spec.url is required when spec.transport is streamable-http or sse")
            if self.stdio is not None:
                raise ValueError("spec.stdio is only allowed when spec.transport is stdio")
        names = [header.name.lower() for header in self.headers]
        if len(names) != len(set(names)):
            raise ValueError("spec.headers names must be unique")
        return self


class ToolInfo(KubeModel):
    """A tool the server offered when last probed."""

    name: Annotated[str, StringConstraints(max_length=256)] = Field(description="Tool name.")
    description: Annotated[str, StringConstraints(max_length=4096)] = Field("", description="What it does.")


class MCPServerStatus(KubeModel):
    """The observed state of the server, written by the operator."""

    phase: MCPServerPhase | None = Field(None, description="Pending, Ready, Unreachable or Invalid.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready; Authorized (OAuth servers, written by the API).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    tools: list[ToolInfo] = Field(default_factory=list, description="Tools discovered by the last probe.")
    tool_count: int | None = Field(None, description="Number of discovered tools.")
    last_probe_time: datetime | None = Field(None, description="When the server was last probed.")
    observed_generation: int | None = Field(None, description="The spec generation last reconciled.")
