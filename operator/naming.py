"""Deterministic, collision-safe names and label values for everything a session becomes."""

from agentbox.crds.naming import (  # the names the API shares; re-exported for the builders
    CLAIMED_FROM_LABEL,
    HASH_LENGTH,
    LAST_ACTIVITY_ANNOTATION,
    MANAGED_BY,
    MANAGER,
    MAX_NAME,
    ORG_LABEL,
    POOL_LABEL,
    POOL_MEMBER_ANNOTATION,
    POOL_TOKEN_PREFIX,
    REQUEST_ID_ANNOTATION,
    RESERVED_PREFIX,
    SESSION_LABEL,
    SUSPEND_REASON_ANNOTATION,
    TEMPLATE_HASH_LABEL,
    TENANT_LABEL,
    child_name,
    label_value,
    session_child_name,
    short_hash,
    slug,
)

ENDPOINT_PORT = 3284
CONFIG_HASH_ANNOTATION = "agentbox.dev/config-hash"
# On a session's pod: the hash of its spec as rendered (absent on pods of operators before it: kept).
SPEC_HASH_ANNOTATION = "agentbox.dev/spec-hash"
# On a pod claimed from a pool: when its Secret and ConfigMap became the session's.
CLAIMED_AT_ANNOTATION = "agentbox.dev/claimed-at"
# On an AgentSessionPool a ClusterAgentSessionPool keeps: that pool's name.
CLUSTER_POOL_LABEL = "agentbox.dev/cluster-pool"

__all__ = ["CLAIMED_FROM_LABEL", "HASH_LENGTH", "LAST_ACTIVITY_ANNOTATION", "MANAGED_BY", "MANAGER",
           "MAX_NAME", "ORG_LABEL", "POOL_LABEL", "POOL_MEMBER_ANNOTATION", "POOL_TOKEN_PREFIX",
           "REQUEST_ID_ANNOTATION", "RESERVED_PREFIX", "SESSION_LABEL", "SUSPEND_REASON_ANNOTATION",
           "TEMPLATE_HASH_LABEL", "TENANT_LABEL", "child_name", "label_value", "session_child_name",
           "short_hash", "slug"]


def tenant_namespace(org: str) -> str:
    return f"tenant-{org}"


def session_labels(session_name: str, org: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, SESSION_LABEL: label_value(session_name), ORG_LABEL: label_value(org)}


def credential_key(server: str, what: str) -> str:
    """The Secret key (and file name) of one MCP credential, e.g. mcp-github-token."""
    return f"mcp-{server}-{slug(what)}"


def env_credential_key(server: str, variable: str) -> str:
    """The Secret key of a stdio server's secret variable: the name kept as is (a valid key already), so
    FOO_BAR and FOO__BAR stay apart."""
    return f"mcp-{server}-env-{variable}"


def endpoint(child: str, namespace: str) -> str:
    """The runner's URL through the Service named `child` (the session's children's name)."""
    return f"http://{child}.{namespace}.svc:{ENDPOINT_PORT}"
