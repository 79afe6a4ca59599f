"""AgentSessionPool (agentbox.dev/v1alpha1): sandboxes of one template, started ahead of demand in one
tenant namespace. A new session there whose pod would be the same claims a ready member instead of
starting one: it takes over the member's pod, workspace claim, ConfigMap and Secret (a fresh runner
token, its own credentials and system prompt), and the pool starts a replacement at once. A claimed member
belongs to its session for good; a namespace belongs to one org, so no member ever serves two tenants."""

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from agentbox.crds.agentsession import ObjectMeta, SandboxTemplate
from agentbox.crds.fields import Condition, KubeModel

GROUP = "agentbox.dev"
VERSION = "v1alpha1"
KIND = "AgentSessionPool"
PLURAL = "agentsessionpools"
API_VERSION = f"{GROUP}/{VERSION}"
MAX_REPLICAS = 50  # the tenant quota's pod count: a pool never holds more than a namespace may run


class AgentSessionPoolSpec(KubeModel):
    """How many sandboxes to keep ready, and what they are."""

    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Unclaimed members to keep (ready or "
                                                                "starting); 0 empties the pool.")
    template: SandboxTemplate = Field(
        default_factory=SandboxTemplate, json_schema_extra={"default": {}},
        description="The sandbox of every member: an AgentSession spec without tenant, system prompt and "
                    "lifecycle. A session claims a member only when its own pod would be the same.")


class AgentSessionPoolStatus(KubeModel):
    """What the operator last saw of the pool's members."""

    replicas: int | None = Field(None, description="Unclaimed members of the current template.")
    ready: int | None = Field(None, description="Unclaimed members ready to be claimed.")
    claimed: int | None = Field(None, description="Running pods that sessions claimed from this pool.")
    template_hash: Annotated[str, StringConstraints(max_length=64)] | None = Field(
        None, description="The hash members carry in agentbox.dev/template-hash, of their pod and their "
                          "workspace's size and class; sessions whose sandbox hashes alike claim them.")
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready: spec.replicas members are ready (False: why not).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


class AgentSessionPool(KubeModel):
    """An AgentSessionPool resource as a whole."""

    api_version: Literal["agentbox.dev/v1alpha1"] = API_VERSION
    kind: Literal["AgentSessionPool"] = KIND
    metadata: ObjectMeta
    spec: AgentSessionPoolSpec
    status: AgentSessionPoolStatus | None = None
