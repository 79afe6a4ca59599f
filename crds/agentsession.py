"""AgentSession (agentbox.dev/v1alpha1): one isolated, running sandbox for one agent of one user.

The same models validate the API's request bodies and generate the CRD schema (`make crds`).
"""

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, StringConstraints, model_validator

from agentbox.crds.conditions import SessionPhase
from agentbox.crds.fields import (
    DNS_LABEL_PATTERN,
    Condition,
    DnsLabel,
    DnsSubdomain,
    Duration,
    KubeModel,
    Quantity,
    ToolFilter,
    preserve_unknown,
)
from agentbox.crds.mcpserver import SecretKeySelector
from agentbox.crds.providers import PROVIDER_APIS, RESERVED_ENV_NAMES, RUNTIME_PROVIDERS, Provider

GROUP = "agentbox.dev"
VERSION = "v1alpha1"
KIND = "AgentSession"
PLURAL = "agentsessions"
API_VERSION = f"{GROUP}/{VERSION}"

Runtime = Literal["claude-code", "gemini", "codex", "scripted", "custom"]


class Tenant(KubeModel):
    """Who the session belongs to."""

    org: Annotated[str, StringConstraints(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=56)] = Field(
        description="The organisation (a DNS label, at most 56 characters so that tenant-<org> is a "
                    "valid namespace name). Immutable.",
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": "spec.tenant.org is immutable"}]})
    user: Annotated[str, StringConstraints(min_length=1, max_length=253)] = Field(
        description="The user the session belongs to: any string (an email, a UUID); slugged safely "
                    "wherever it becomes part of a name or label.")


RESERVED_ENV_MESSAGE = ("spec.agent.env[].name must not be a provider credential, base URL or proxy variable "
                        f"({', '.join(RESERVED_ENV_NAMES)}): the platform sets them; a provider key goes in "
                        "spec.egress.providerKey, where only the egress proxy reads it")


class EnvVar(KubeModel):
    """An environment variable for the agent (a Kubernetes EnvVar)."""

    name: Annotated[str, StringConstraints(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)] = Field(
        description="Variable name. Names starting with AGENTBOX_ are reserved for the sandbox; provider "
                    "credentials, base URLs and proxy variables are set by the platform.",
        json_schema_extra={"x-kubernetes-validations": [
            {"rule": "!self.startsWith('AGENTBOX_')",
             "message": "spec.agent.env[].name must not start with AGENTBOX_ (reserved)"},
            {"rule": f"!(self in {list(RESERVED_ENV_NAMES)})", "message": RESERVED_ENV_MESSAGE}]})
    value: str | None = Field(None, description="A literal value.", max_length=32768)
    value_from: dict[str, Any] | None = preserve_unknown(
        "A source for the value (secretKeyRef, configMapKeyRef, fieldRef...).", default=None)

    @model_validator(mode="after")
    def _not_reserved(self) -> "EnvVar":
        if self.name.startswith("AGENTBOX_"):
            raise ValueError("spec.agent.env[].name must not start with AGENTBOX_ (reserved)")
        if self.name in RESERVED_ENV_NAMES:
            raise ValueError(RESERVED_ENV_MESSAGE)
        return self


class AgentSpec(KubeModel):
    """Which agent runs in the sandbox and how it is started."""

    model_config = KubeModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [
        {"rule": "!has(self.runtime) || self.runtime != 'custom' || "
                 "(has(self.command) && size(self.command) > 0)",
         "message": "spec.agent.command is required when spec.agent.runtime is custom"}]}}

    runtime: Runtime = Field("claude-code", description="The agent: claude-code, gemini, codex, scripted "
                                                        "(deterministic, for tests and demos) or custom.")
    image: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = Field(
        None, description="Container image of the sandbox; defaults to the operator's sandbox image.")
    command: list[Annotated[str, StringConstraints(max_length=4096)]] | None = Field(
        None, max_length=64, description="The agent's command line; required for custom, overrides the "
                                         "runtime's default otherwise.")
    args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(
        default_factory=list, max_length=64, description="Extra arguments for the agent.")
    model: Annotated[str, StringConstraints(max_length=256)] | None = Field(
        None, description="The model the agent should use, when the runtime supports choosing one.")
    env: list[EnvVar] = Field(default_factory=list, max_length=128,
                              description="Extra environment variables for the agent.")

    @model_validator(mode="after")
    def _custom_needs_command(self) -> "AgentSpec":
        if self.runtime == "custom" and not self.command:
            raise ValueError("spec.agent.command is required when spec.agent.runtime is custom")
        return self


class Workspace(KubeModel):
    """The persistent volume mounted at /workspace."""

    size: Quantity = Field("1Gi", description="Requested capacity, a quantity such as 1Gi. A session's may "
                                              "grow (where its StorageClass allows expansion), never shrink.",
                           json_schema_extra={"x-kubernetes-validations": [
                               {"rule": "!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))",
                                "message": "must be greater than zero"}]})
    storage_class_name: DnsSubdomain | None = Field(None, description="StorageClass of the claim; the "
                                                                      "cluster default when unset. A "
                                                                      "session's is immutable.")
    retain_on_delete: bool = Field(False, description="Keep the workspace claim when the session is "
                                                      "deleted.")


class MCPServerRef(KubeModel):
    """An MCPServer in the same namespace, and which of its tools this session may use."""

    name: DnsLabel = Field(description="Name of the MCPServer.")
    tools: ToolFilter = Field(default_factory=ToolFilter, description="Further narrows the server's tools.",
                              json_schema_extra={"default": {}})


class Lifecycle(KubeModel):
    """When the sandbox runs and when it ends."""

    suspend: bool = Field(False, description="Delete the pod and keep the workspace; clear to resume.")
    shutdown_time: datetime | None = Field(None, description="The session expires at this time (RFC 3339).")
    idle_timeout: Duration | None = Field(
        None, description="The session is suspended after this long without activity, e.g. 30m; its next "
                          "message through the API resumes it.")


# A host name, or *. and a domain for every name under it (not the domain itself).
HOST_PATTERN_RE = r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_CEL_HOST_PATTERN = HOST_PATTERN_RE.replace("\\", "\\\\")  # a CEL string literal escapes backslashes
HOST_PATTERN_MESSAGE = ("spec.egress.allow[] must be a lower-case host name (api.github.com) or *. and a "
                        "domain (*.githubusercontent.com): no scheme, port, path or IP address")


def _not_an_address(host: str) -> str:
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(HOST_PATTERN_MESSAGE)
    return host


HostPattern = Annotated[str, StringConstraints(pattern=HOST_PATTERN_RE, min_length=1, max_length=253),
                        AfterValidator(_not_an_address),
                        Field(json_schema_extra={"x-kubernetes-validations": [
                            {"rule": f"self.matches('{_CEL_HOST_PATTERN}') && !self.matches('^[0-9.]+$')",
                             "message": HOST_PATTERN_MESSAGE}]})]


class Egress(KubeModel):
    """Where the agent may connect, through the egress proxy in its pod, and the provider key the proxy
    adds to the agent's model API calls."""

    allow: list[HostPattern] = Field(
        default_factory=list, max_length=64,
        description="Hosts the agent may reach over HTTPS through the proxy, beside the operator's default "
                    "list: names such as api.github.com, or *.example.com for every name under "
                    "example.com. The provider's API needs no entry.")
    provider: Provider | None = Field(
        None, description="The model provider whose key spec.egress.providerKey holds: anthropic, gemini "
                          "or openai. Defaults to the runtime's (claude-code: anthropic, gemini: gemini, "
                          "codex: openai); scripted and custom sessions name one.")
    provider_key: SecretKeySelector | None = Field(
        None, description="The Secret key (same namespace) holding the provider's API key. Mounted only "
                          "into the egress proxy: the agent gets a placeholder and the proxy's address as "
                          "its base URL.")


PROVIDER_NEEDED_MESSAGE = (f"spec.egress.provider is required with spec.egress.providerKey when spec.agent."
                           f"runtime is not one of {', '.join(RUNTIME_PROVIDERS)} (one of "
                           f"{', '.join(PROVIDER_APIS)})")


_TEMPLATE_RULES = [
    {"rule": "!has(self.egress) || !has(self.egress.providerKey) || has(self.egress.provider) || "
             f"(has(self.agent.runtime) && self.agent.runtime in {list(RUNTIME_PROVIDERS)})",
     "message": PROVIDER_NEEDED_MESSAGE}]
# A session's workspace claim, unlike a pool's template, exists: Kubernetes lets a bound claim grow only,
# and never changes its class. (workspace and its size have defaults: they are always there.)
_SESSION_WORKSPACE_RULES = [
    {"rule": "!isQuantity(self.workspace.size) || !isQuantity(oldSelf.workspace.size) || "
             "quantity(self.workspace.size).compareTo(quantity(oldSelf.workspace.size)) >= 0",
     "message": "spec.workspace.size may grow, never shrink", "fieldPath": ".workspace.size"},
    {"rule": "has(self.workspace.storageClassName) == has(oldSelf.workspace.storageClassName) && "
             "(!has(self.workspace.storageClassName) || "
             "self.workspace.storageClassName == oldSelf.workspace.storageClassName)",
     "message": "spec.workspace.storageClassName is immutable", "fieldPath": ".workspace.storageClassName"}]


class SandboxTemplate(KubeModel):
    """Everything that shapes a sandbox pod: what an AgentSessionPool pre-starts, and what a session shares
    with the pool member it claims. Tenant, system prompt and lifecycle are the session's own."""

    model_config = KubeModel.model_config | {"json_schema_extra": {
        "x-kubernetes-validations": _TEMPLATE_RULES}}

    agent: AgentSpec = Field(default_factory=AgentSpec, description="The agent and how it starts.",
                             json_schema_extra={"default": {}})
    workspace: Workspace = Field(default_factory=Workspace, description="The persistent workspace.",
                                 json_schema_extra={"default": {}})
    mcp_servers: list[MCPServerRef] = Field(
        default_factory=list, max_length=32, description="MCPServers (same namespace) the agent may use.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]})
    resources: dict[str, Any] | None = preserve_unknown(
        "Compute resources of the agent container (requests, limits); the operator's defaults when unset.",
        default=None)
    runtime_class_name: DnsSubdomain | None = Field(None, description="RuntimeClass for stronger isolation, "
                                                                      "e.g. gvisor or kata.")
    node_selector: dict[str, Annotated[str, StringConstraints(max_length=63)]] = Field(
        default_factory=dict, description="Node labels the pod must match.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, max_length=32, description="Tolerations of the pod (Kubernetes Toleration).",
        json_schema_extra={"items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}})
    egress: Egress = Field(default_factory=Egress, description="The agent's way out: hosts allowed through "
                                                              "the egress proxy, and the provider key.",
                           json_schema_extra={"default": {}})

    @property
    def provider(self) -> Provider | None:
        """The provider the session's key is for (None: scripted or custom without spec.egress.provider)."""
        return self.egress.provider or RUNTIME_PROVIDERS.get(self.agent.runtime)

    @model_validator(mode="after")
    def _unique_mcp_servers(self) -> "SandboxTemplate":
        names = [ref.name for ref in self.mcp_servers]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"spec.mcpServers names must be unique; repeated: {', '.join(duplicates)}")
        if self.egress.provider_key is not None and self.provider is None:
            raise ValueError(PROVIDER_NEEDED_MESSAGE)
        if self.resources and set(self.resources) - {"limits", "requests", "claims"}:
            raise ValueError("spec.resources may only hold limits, requests and claims")
        return self


class AgentSessionSpec(SandboxTemplate):
    """The desired state of an agent sandbox."""

    model_config = KubeModel.model_config | {"json_schema_extra": {
        "x-kubernetes-validations": _TEMPLATE_RULES + _SESSION_WORKSPACE_RULES}}

    tenant: Tenant = Field(description="Who the session belongs to.")
    system_prompt: Annotated[str, StringConstraints(max_length=65536)] = Field(
        "", description="The composed system prompt handed to the agent.")
    lifecycle: Lifecycle = Field(default_factory=Lifecycle, description="Suspension and expiry.",
                                 json_schema_extra={"default": {}})


class AgentSessionStatus(KubeModel):
    """The observed state of the sandbox, written by the operator."""

    phase: SessionPhase | None = Field(None, description="Pending, Starting, Running, NeedsAuth, Suspended, "
                                                         "Expired, Failed or Terminating.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, PodScheduled, WorkspaceReady, MCPReady, Suspended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})
    observed_generation: int | None = Field(None, description="The spec generation last reconciled.")
    pod_name: str | None = Field(None, description="The sandbox pod.")
    endpoint: str | None = Field(None, description="In-cluster URL of the session's agent API.")
    started_at: datetime | None = Field(None, description="When the sandbox pod started.")
    ready_at: datetime | None = Field(None, description="When the session first became ready.")
    last_activity_time: datetime | None = Field(None, description="The last activity seen by the runner or "
                                                                  "the API.")
    pool_member: str | None = Field(None, description="The AgentSessionPool member (a pre-started sandbox) "
                                                      "the session claimed; unset for a cold start.")


class ObjectMeta(KubeModel):
    """The part of Kubernetes metadata a client sets."""

    model_config = KubeModel.model_config | {"extra": "allow"}

    name: DnsSubdomain
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class AgentSession(KubeModel):
    """An AgentSession resource as a whole."""

    api_version: Literal["agentbox.dev/v1alpha1"] = API_VERSION
    kind: Literal["AgentSession"] = KIND
    metadata: ObjectMeta
    spec: AgentSessionSpec
    status: AgentSessionStatus | None = None
