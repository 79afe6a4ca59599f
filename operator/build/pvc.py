"""The workspace claim, mounted at /workspace."""

from typing import Any

from agentbox.operator.build.common import Session


def build_pvc(session: Session) -> dict[str, Any]:
    workspace = session.spec.workspace
    spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                            "resources": {"requests": {"storage": workspace.size}}}
    if workspace.storage_class_name:
        spec["storageClassName"] = workspace.storage_class_name
    metadata = session.metadata()
    if workspace.retain_on_delete:
        metadata["annotations"] = {"agentbox.dev/retain-on-delete": "true"}
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": metadata, "spec": spec}
