"""ClusterAgentSessionPool (agentbox.dev/v1alpha1, cluster-scoped): one pool definition for many tenants. The
operator keeps an AgentSessionPool of the same name and spec in every tenant namespace it selects, owned by
this object, so each org gets its own members: a pod never leaves its namespace, and a namespace is one
org's, so a cluster-wide pool shares nothing between tenants. A namespace that stops matching loses its
pool; deleting this object deletes them all."""

from typing import Annotated, Literal

from pydantic import Field, StringConstraints

from agentbox.crds.agentsession import ObjectMeta
from agentbox.crds.agentsessionpool import MAX_REPLICAS, AgentSessionPoolSpec
from agentbox.crds.fields import Condition, KubeModel

GROUP = "agentbox.dev"
VERSION = "v1alpha1"
KIND = "ClusterAgentSessionPool"
PLURAL = "clusteragentsessionpools"
API_VERSION = f"{GROUP}/{VERSION}"

LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=317)]
LabelValue = Annotated[str, StringConstraints(max_length=63)]


class LabelSelectorRequirement(KubeModel):
    """One requirement on a namespace's labels, as in any Kubernetes label selector."""

    model_config = KubeModel.model_config | {"json_schema_extra": {"x-kubernetes-validations": [
        {"rule": "self.operator in ['In', 'NotIn'] ? has(self.values) && size(self.values) > 0 "
                 ": !has(self.values) || size(self.values) == 0",
         "message": "spec.namespaceSelector.matchExpressions[].values must be non-empty for In and NotIn, "
                    "and empty for Exists and DoesNotExist"}]}}

    key: LabelKey = Field(description="The label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(description="How the key relates to "
                                                                                   "the values.")
    values: list[LabelValue] = Field(default_factory=list, max_length=64, description="The values.")


class NamespaceSelector(KubeModel):
    """Which tenant namespaces get the pool; the requirements are ANDed, and empty selects every one."""

    match_labels: dict[str, LabelValue] = Field(default_factory=dict, description="Labels a namespace must "
                                                                                  "carry.")
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list, max_length=16,
                                                              description="Further requirements.")


class ClusterAgentSessionPoolSpec(AgentSessionPoolSpec):
    """The pool each selected tenant namespace gets, and which namespaces those are."""

    replicas: int = Field(1, ge=0, le=MAX_REPLICAS, description="Unclaimed members to keep in each selected "
                                                                "namespace (ready or starting).")
    namespace_selector: NamespaceSelector = Field(
        default_factory=NamespaceSelector, json_schema_extra={"default": {}},
        description="The tenant namespaces (those labelled agentbox.dev/tenant) that get a pool; empty: all "
                    "of them. Match on the org with agentbox.dev/tenant itself.")


class ClusterAgentSessionPoolStatus(KubeModel):
    """What the operator last saw of the pools it keeps."""

    namespaces: int | None = Field(None, description="Tenant namespaces that have this pool.")
    replicas: int | None = Field(None, description="Unclaimed members across those namespaces.")
    ready: int | None = Field(None, description="Unclaimed members ready to be claimed, across them.")
    claimed: int | None = Field(None, description="Running pods that sessions claimed from these pools.")
    observed_generation: int | None = Field(None, description="The spec generation last acted on.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready: every selected namespace's pool is ready (False: why not).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]})


class ClusterAgentSessionPool(KubeModel):
    """A ClusterAgentSessionPool resource as a whole."""

    api_version: Literal["agentbox.dev/v1alpha1"] = API_VERSION
    kind: Literal["ClusterAgentSessionPool"] = KIND
    metadata: ObjectMeta
    spec: ClusterAgentSessionPoolSpec
    status: ClusterAgentSessionPoolStatus | None = None
