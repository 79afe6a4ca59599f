"""What every child manifest shares: its owner, its name, its labels."""

from dataclasses import dataclass
from typing import Any

from agentbox.crds import agentsession
from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.operator import naming


@dataclass(frozen=True)
class Session:
    """The parent of every child: identity plus the validated spec. `member`: the pool member it claimed,
    whose name its children keep."""

    name: str
    namespace: str
    uid: str
    spec: AgentSessionSpec
    member: str | None = None

    @property
    def child_name(self) -> str:
        return self.member or naming.child_name(self.name)

    @property
    def labels(self) -> dict[str, str]:
        return naming.session_labels(self.name, self.spec.tenant.org)

    def owner_reference(self) -> dict[str, Any]:
        return {"apiVersion": agentsession.API_VERSION, "kind": agentsession.KIND, "name": self.name,
                "uid": self.uid, "controller": True, "blockOwnerDeletion": True}

    def metadata(self, annotations: dict[str, str] | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.child_name, "namespace": self.namespace, "labels": self.labels,
                                "ownerReferences": [self.owner_reference()]}
        if annotations:
            meta["annotations"] = annotations
        return meta
