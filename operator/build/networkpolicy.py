"""Network policies: one per session, plus the tenant namespace's default deny."""

from typing import Any

from agentbox.operator import naming
from agentbox.operator.build.common import Session
from agentbox.operator.build.service import pod_selector

PRIVATE_IPV4 = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "100.64.0.0/10",
                "127.0.0.0/8"]
PRIVATE_IPV6 = ["fc00::/7", "fe80::/10", "::1/128"]


def dns_egress() -> dict[str, Any]:
    """DNS to the cluster resolver only."""
    return {"to": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
            "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]}


def build_session_policy(session: Session, api_namespace: str, api_pod_labels: dict[str, str],
                         ports: list[int]) -> dict[str, Any]:
    """Ingress only from the control-plane API; egress to DNS, and to public addresses on `ports` only
    (egress.egress_ports: HTTPS and the session's MCP servers' ports). A NetworkPolicy knows addresses,
    not names: which hosts the agent reaches is the egress proxy's allow-list."""
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": session.metadata(),
        "spec": {
            "podSelector": {"matchLabels": pod_selector(session)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                                       "kubernetes.io/metadata.name": api_namespace}},
                                   "podSelector": {"matchLabels": dict(api_pod_labels)}}],
                         "ports": [{"protocol": "TCP", "port": naming.ENDPOINT_PORT}]}],
            "egress": [dns_egress(),
                       {"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_IPV4}},
                               {"ipBlock": {"cidr": "::/0", "except": PRIVATE_IPV6}}],
                        "ports": [{"protocol": "TCP", "port": port} for port in ports]}],
        },
    }
