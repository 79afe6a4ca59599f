"""The baseline of a tenant namespace: Pod Security "restricted", quota, limits, default deny, and the
API's access."""

from typing import Any

from agentbox.operator import naming
from agentbox.operator.build.networkpolicy import dns_egress

BASELINE_LABELS = {naming.MANAGED_BY: naming.MANAGER}
QUOTA_NAME = "agentbox-tenant-quota"
LIMITS_NAME = "agentbox-tenant-limits"
DEFAULT_DENY_NAME = "agentbox-default-deny"


def pod_security_labels() -> dict[str, str]:
    labels = {}
    for mode in ("enforce", "audit", "warn"):
        labels[f"pod-security.kubernetes.io/{mode}"] = "restricted"
        labels[f"pod-security.kubernetes.io/{mode}-version"] = "latest"
    return labels


def build_namespace_labels(name: str) -> dict[str, Any]:
    """The fields of the namespace the operator owns (applied server-side, nothing else touched)."""
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": pod_security_labels()}}


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": dict(BASELINE_LABELS)}


def build_quota(namespace: str, hard: dict[str, str]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _metadata(QUOTA_NAME, namespace),
            "spec": {"hard": dict(hard)}}


def build_limit_range(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "LimitRange", "metadata": _metadata(LIMITS_NAME, namespace),
            "spec": {"limits": [{"type": "Container",
                                 "default": {"cpu": "1", "memory": "1Gi"},
                                 "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                                 "max": {"cpu": "8", "memory": "16Gi"}},
                                {"type": "PersistentVolumeClaim", "max": {"storage": "100Gi"}}]}}


def build_default_deny(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _metadata(DEFAULT_DENY_NAME, namespace),
            "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"], "egress": [dns_egress()]}}


def build_api_binding(namespace: str, role: str, account: str, account_namespace: str) -> dict[str, Any]:
    """Lets the control-plane API in: its rights on Secrets, sessions and MCP servers hold only in tenant
    namespaces (the ClusterRole `role`, bound here), never cluster-wide. Named after the role, as a
    binding's roleRef cannot change."""
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": _metadata(role, namespace),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": account_namespace}]}
