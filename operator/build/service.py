"""The Service in front of the runner's agent API: headless (one pod behind it, nothing to balance), so
sessions never exhaust the cluster's service IP range and DNS answers with the pod address itself."""

from typing import Any

from agentbox.operator import naming
from agentbox.operator.build.common import Session


def pod_selector(session: Session) -> dict[str, str]:
    labels = session.labels
    return {naming.MANAGED_BY: labels[naming.MANAGED_BY], naming.SESSION_LABEL: labels[naming.SESSION_LABEL]}


def build_service(session: Session) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": session.metadata(),
            "spec": {"type": "ClusterIP", "clusterIP": "None", "selector": pod_selector(session),
                     "ports": [{"name": "http", "port": naming.ENDPOINT_PORT, "targetPort": "http",
                                "protocol": "TCP"}]}}
