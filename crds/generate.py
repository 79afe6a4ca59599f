"""Render the CRD YAML from the Pydantic models: `python -m agentbox.crds.generate` (`make crds`).

Pydantic's JSON Schema is close to a Kubernetes structural schema; `structural()` closes the gap
($refs inlined, no titles, Optional collapsed, free-form objects marked preserve-unknown).
"""

import copy
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from agentbox.crds import agentsession, agentsessionpool, clusteragentsessionpool, mcpserver

CRD_DIR = Path(__file__).resolve().parent
CATEGORY = "agentbox"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        siblings = {key: value for key, value in node.items() if key != "$ref"}
        return _inline({**target, **siblings}, defs)
    return {key: _inline(value, defs) for key, value in node.items() if key not in ("$defs", "title")}


def _structural(node: Any) -> Any:
    if isinstance(node, list):
        return [_structural(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    variants = node.pop("anyOf", None)
    if variants is not None:
        # Optional[X]: absence already means None in Kubernetes, so keep X alone.
        present = [variant for variant in variants if variant.get("type") != "null"]
        if len(present) != 1:
            raise ValueError(f"cannot express anyOf {variants} as a structural schema")
        node = {**present[0], **node}
    if node.get("default", ...) is None:
        del node["default"]
    extra = node.get("additionalProperties")
    if extra is True or extra == {}:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    elif extra is False:
        del node["additionalProperties"]  # structural schemas forbid it; pruning drops unknown fields
    if node.get("x-kubernetes-preserve-unknown-fields"):
        node["type"] = node.get("type", "object")
    return {key: _structural(value) for key, value in node.items()}


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The model's validation schema as a Kubernetes structural OpenAPI v3 schema."""
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(_inline(schema, schema.get("$defs", {})))


def _column(name: str, path: str, kind: str = "string", priority: int = 0) -> dict[str, Any]:
    column = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority
    return column


def crd(module: Any, singular: str, short_name: str, spec: type[BaseModel], status: type[BaseModel],
        columns: list[dict[str, Any]], description: str, scale: bool = False,
        scope: str = "Namespaced") -> dict[str, Any]:
    """`scale`: a scale subresource on spec.replicas (`kubectl scale`)."""
    subresources: dict[str, Any] = {"status": {}}
    if scale:
        subresources["scale"] = {"specReplicasPath": ".spec.replicas",
                                 "statusReplicasPath": ".status.replicas"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{module.PLURAL}.{module.GROUP}"},
        "spec": {
            "group": module.GROUP,
            "scope": scope,
            "names": {"kind": module.KIND, "listKind": f"{module.KIND}List", "plural": module.PLURAL,
                      "singular": singular, "shortNames": [short_name], "categories": [CATEGORY]},
            "versions": [{
                "name": module.VERSION,
                "served": True,
                "storage": True,
                "subresources": subresources,
                "additionalPrinterColumns": [*columns,
                                             _column("Age", ".metadata.creationTimestamp", "date")],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "description": description,
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": structural(spec),
                        "status": structural(status),
                    },
                }},
            }],
        },
    }


def kopf_peering(kind: str, plural: str, scope: str) -> dict[str, Any]:
    """kopf's peering resource (group kopf.dev): how operator replicas elect the active one."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev", "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [{"name": "v1", "served": True, "storage": True, "schema": {"openAPIV3Schema": {
                "type": "object",
                "properties": {"status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}},
            }}}],
        },
    }


def render() -> dict[str, str]:
    """File name -> YAML text for every CRD."""
    definitions = [
        crd(agentsession, "agentsession", "ags", agentsession.AgentSessionSpec,
            agentsession.AgentSessionStatus,
            [_column("Org", ".spec.tenant.org"), _column("User", ".spec.tenant.user"),
             _column("Runtime", ".spec.agent.runtime"), _column("Phase", ".status.phase"),
             _column("Endpoint", ".status.endpoint", priority=1)],
            "An isolated sandbox running one AI coding agent for one user, with its workspace and MCP "
            "gateway."),
        crd(mcpserver, "mcpserver", "mcps", mcpserver.MCPServerSpec, mcpserver.MCPServerStatus,
            [_column("Transport", ".spec.transport"), _column("Phase", ".status.phase"),
             _column("Tools", ".status.toolCount", "integer"), _column("URL", ".spec.url", priority=1)],
            "An MCP server that AgentSessions in the same namespace may use through their gateway."),
        crd(agentsessionpool, "agentsessionpool", "agp", agentsessionpool.AgentSessionPoolSpec,
            agentsessionpool.AgentSessionPoolStatus,
            [_column("Desired", ".spec.replicas", "integer"), _column("Ready", ".status.ready", "integer"),
             _column("Claimed", ".status.claimed", "integer"),
             _column("Runtime", ".spec.template.agent.runtime")],
            "Sandboxes started ahead of demand in one tenant namespace, claimed by new AgentSessions of "
            "the same template.", scale=True),
        crd(clusteragentsessionpool, "clusteragentsessionpool", "cagp",
            clusteragentsessionpool.ClusterAgentSessionPoolSpec,
            clusteragentsessionpool.ClusterAgentSessionPoolStatus,
            [_column("Desired", ".spec.replicas", "integer"),
             _column("Namespaces", ".status.namespaces", "integer"),
             _column("Ready", ".status.ready", "integer"), _column("Claimed", ".status.claimed", "integer"),
             _column("Runtime", ".spec.template.agent.runtime")],
            "An AgentSessionPool kept in every tenant namespace it selects: each org gets members of its "
            "own.", scope="Cluster"),
    ]
    header = ("# Generated by `make crds` (python -m agentbox.crds.generate) from the Pydantic models. "
              "Do not edit.\n")
    files = {f"{item['metadata']['name']}.yaml": header + yaml.safe_dump(item, sort_keys=False, width=100)
             for item in definitions}
    peerings = [kopf_peering("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
                kopf_peering("KopfPeering", "kopfpeerings", "Namespaced")]
    files["kopf-peering.yaml"] = header + yaml.safe_dump_all(peerings, sort_keys=False, width=100)
    return files


def main() -> int:
    for name, text in render().items():
        (CRD_DIR / name).write_text(text)
        print(f"wrote {CRD_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
