"""Operator settings (environment variables prefixed AGENTBOX_) and kopf's own tuning.

Writes go through kubernetes_asyncio rather than kopf's internal client: kopf exposes no public API for
arbitrary reads and server-side apply, and kubernetes_asyncio keeps every call on the event loop.
"""

import logging
from typing import Any

import kopf
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agentbox.crds.agentsession import HostPattern
from agentbox.operator.naming import MANAGED_BY, MANAGER, TENANT_LABEL

FIELD_MANAGER = "agentbox-operator"
ANNOTATION_PREFIX = "operator.agentbox.dev"
FINALIZER = f"{ANNOTATION_PREFIX}/finalizer"  # only on sessions with retainOnDelete
LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBOX_", extra="ignore")

    sandbox_image: str = "ghcr.io/agentbox-dev/sandbox:0.1.0"
    # The runner's image per runtime (sandbox/images/Dockerfile.agent: the runner and that runtime's agent);
    # a runtime not listed (scripted, custom) runs in sandbox_image, and a session's spec.agent.image wins.
    agent_images: dict[str, str] = {runtime: f"ghcr.io/agentbox-dev/agent-{runtime}:0.1.0"
                                    for runtime in ("claude-code", "gemini", "codex")}
    image_pull_policy: str = "IfNotPresent"
    log_level: str = "info"
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(0, description="0 disables the metrics endpoint")
    api_namespace: str = Field("agentbox-system", description="Namespace of the control-plane API pods")
    api_pod_labels: dict[str, str] = {"app.kubernetes.io/name": "agentbox",
                                      "app.kubernetes.io/component": "api"}
    tenant_quota: dict[str, str] = {
        "pods": "50", "requests.cpu": "20", "requests.memory": "40Gi", "limits.cpu": "40",
        "limits.memory": "80Gi", "requests.storage": "200Gi", "persistentvolumeclaims": "50"}
    runner_resources: dict[str, Any] = {"requests": {"cpu": "250m", "memory": "512Mi"},
                                        "limits": {"cpu": "2", "memory": "2Gi"}}
    gateway_resources: dict[str, Any] = {"requests": {"cpu": "50m", "memory": "96Mi"},
                                         "limits": {"cpu": "500m", "memory": "256Mi"}}
    # The proxy holds about 51 MiB resident once started (measured: python -m agentbox.sandbox.egress).
    # It copies bytes between the agent and its upstreams: a fifth of a core is plenty, and keeps a session's
    # cost under the tenant quota close to what it was before the proxy.
    egress_resources: dict[str, Any] = {"requests": {"cpu": "25m", "memory": "64Mi"},
                                        "limits": {"cpu": "200m", "memory": "128Mi"}}
    egress_default_allow: list[HostPattern] = Field(
        [], description="Hosts every session's agent may reach through its egress proxy, beside the "
                        "session's spec.egress.allow (names, or *.domain)")
    # Provider name -> base URL the egress proxy forwards to instead of the public API (a fake provider in
    # tests and development; http:// only to loopback).
    provider_upstreams: dict[str, str] = Field({}, description="Provider base URLs replacing the public APIs")
    # Where session pods may run, beside each session's own spec.nodeSelector and spec.tolerations (which
    # win on a clash): the local real node, for one, is tainted and labelled agentbox.dev/real-node=true.
    session_node_selector: dict[str, str] = Field({}, description="Node labels every session pod must match")
    session_tolerations: list[dict[str, Any]] = Field([], description="Tolerations every session pod gets")
    mcp_probe_seconds: float = 60.0
    # The probe goes where a tenant's MCPServer says: private-network and loopback addresses only when this
    # is true (MCP servers inside the cluster, development, tests); link-local and metadata never
    # (agentbox.crds.addresses, the API's AGENTBOX_MCP_TEST_ALLOW_PRIVATE_NETWORKS likewise).
    mcp_probe_allow_private_networks: bool = Field(False, description="Whether MCPServers on private-network "
                                                                      "and loopback addresses are probed")
    mcp_backoff_max_seconds: float = 600.0
    conflict_retry_seconds: float = 30.0
    secret_check_seconds: float = Field(5.0, description="How often Secrets that MCPServers reference are "
                                                        "re-read; a change rolls the pods that use them")
    # Unbounded, 1,000 sessions created at 50/s left the operator 280-294 MB resident; at 64, 131-132 MB.
    concurrent_objects: int = Field(64, ge=1, description="Objects reconciled at once per watched resource "
                                                          "(and namespace); the rest queue")
    worker_idle_seconds: float = Field(0.5, gt=0, description="How long an object's worker outlives its "
                                                              "last event before freeing its slot")
    # kopf's default is 60 s: a replica killed without a clean exit (SIGKILL, a lost node) kept its standby
    # paused for up to a minute. kopf refreshes the record 5-10 s before it expires (at least every second).
    peering_lifetime_seconds: int = Field(10, ge=5, description="How long a replica's peering record counts "
                                                               "as alive: the longest a standby waits for a "
                                                               "killed active replica")
    # The tenant namespaces' RoleBinding that lets the API in (empty: none is made).
    api_service_account: str = Field("", description="The API's ServiceAccount (in api_namespace)")
    api_tenant_role: str = Field("", description="The ClusterRole the API gets in each tenant namespace")

    def runner_image(self, runtime: str) -> str:
        return self.agent_images.get(runtime, self.sandbox_image)

    @model_validator(mode="after")
    def _api_binding_named_in_full(self) -> "OperatorSettings":
        if bool(self.api_service_account) != bool(self.api_tenant_role):
            raise ValueError("AGENTBOX_API_SERVICE_ACCOUNT and AGENTBOX_API_TENANT_ROLE are set together "
                             "(the API's RoleBinding in tenant namespaces needs both) or not at all")
        return self


class MemoryDiffBaseStorage(kopf.DiffBaseStorage):
    """The last handled spec, labels and annotations of each object, kept in memory.

    kopf's stock storages write them onto the object after every change handled: one more PATCH per
    session, and one more watch event for every watcher. In memory, a restarted operator (or a standby
    taking over) knows none, so kopf resumes every object, which reconciles it in full anyway.

    Built without copying: kopf's own build deep-copies the whole body on every watch event (managedFields,
    status, whole pods) only to keep spec, labels and annotations, and then copies that again: the largest
    item in a profile of the operator while sessions are created. Watch bodies are parsed afresh for each
    event and never modified afterwards, so the essence may share their spec. Annotations are left out as
    kopf leaves them out, through its own (private) detection of other kopf operators' prefixes."""

    def __init__(self) -> None:
        super().__init__()
        self._handled: dict[str, kopf.BodyEssence] = {}

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        if extra_fields:  # fields a handler asks for may live anywhere: kopf's own way
            return super().build(body=body, extra_fields=extra_fields)
        meta = body.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        # Left out as kopf leaves them out, and ours (kopf's progress; earlier versions' diff base) too.
        foreign = {*self._detect_marked_prefixes(annotations), ANNOTATION_PREFIX}
        essence: dict[str, Any] = {key: value for key, value in body.items()
                                   if key not in ("apiVersion", "kind", "metadata", "status")}
        essence["metadata"] = {
            "labels": dict(meta.get("labels") or {}),
            "annotations": {key: value for key, value in annotations.items()
                            if key != LAST_APPLIED and key.split("/", 1)[0] not in foreign}}
        self.remove_empty_stanzas(essence)
        return essence

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return self._handled.get(body.metadata.uid)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        self._handled[body.metadata.uid] = essence

    def forget(self, uid: str) -> None:
        """The object is deleted: nothing of it stays."""
        self._handled.pop(uid, None)


class UnmarkedProgressStorage(kopf.AnnotationsProgressStorage):
    """kopf's progress annotations without its `<prefix>/kopf-managed` marker, which kopf adds to every
    object it handles even when no progress outlives the handling: one more PATCH per session. The marker
    tells kopf's essence builder which annotations to leave out; MemoryDiffBaseStorage leaves ours out
    itself. (kopf offers no setting for it: this overrides the private hook that writes it.)"""

    def _store_marker(self, prefix: str, patch: kopf.Patch, body: kopf.Body) -> None:
        return None

    def clear(self, *, essence: kopf.BodyEssence) -> kopf.BodyEssence:
        """kopf's clear deep-copies every essence; MemoryDiffBaseStorage's hold none of our annotations."""
        annotations = (essence.get("metadata") or {}).get("annotations") or {}
        if any(key.startswith(f"{self.prefix}/") for key in annotations):
            return super().clear(essence=essence)
        return essence


def configure_kopf(settings: kopf.OperatorSettings, ours: OperatorSettings) -> None:
    """Progress in annotations under our own prefix, the last handled state in memory; status is ours
    alone (kopf keeps none there)."""
    settings.persistence.progress_storage = UnmarkedProgressStorage(prefix=ANNOTATION_PREFIX)
    settings.persistence.diffbase_storage = MemoryDiffBaseStorage()
    settings.persistence.finalizer = FINALIZER
    settings.posting.level = logging.INFO
    settings.peering.lifetime = ours.peering_lifetime_seconds
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.inactivity_timeout = 600
    # Only our own pods, claims and tenant namespaces travel over the watch streams, not the cluster's.
    for resource in ("v1/pods", "v1/persistentvolumeclaims"):
        settings.watching.label_selectors[resource] = f"{MANAGED_BY}={MANAGER}"
    settings.watching.label_selectors["v1/namespaces"] = TENANT_LABEL
    settings.execution.max_workers = 2  # every handler is async; the pool only serves kopf internals
    settings.queueing.worker_limit = ours.concurrent_objects
    # A per-object worker holds its slot until it has been idle this long (kopf's default: 5 s), so the
    # slots above capped reconciles at ~13 new sessions/s; a worker is cheap to start again.
    settings.queueing.idle_timeout = ours.worker_idle_seconds
