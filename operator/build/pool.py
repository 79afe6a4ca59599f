"""Pool members: the children of a session that does not exist yet, owned by their AgentSessionPool and
labelled for it; and the patch that hands one over to the session that claims it."""

import base64
import secrets
from typing import Any

from agentbox.crds import agentsessionpool, clusteragentsessionpool
from agentbox.crds.agentsession import AgentSessionSpec, SandboxTemplate
from agentbox.crds.clusteragentsessionpool import ClusterAgentSessionPoolSpec, NamespaceSelector
from agentbox.operator import naming
from agentbox.operator.build.common import Session

MEMBER_KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Pod")  # a member has no Service or policy
POOL_USER = "pool"  # the tenant user of a member's placeholder spec: never on any object


def member_name(pool: str) -> str:
    """A new member's name, the name of all its children: the pool's slug and a random suffix."""
    prefix = naming.slug(pool)[:40].rstrip("-") or "pool"
    return f"{prefix}-{secrets.token_hex(4)}"


def member_session(pool: dict[str, Any], template: SandboxTemplate, member: str, org: str) -> Session:
    """The session the member's children are built for: the pool's template, no system prompt."""
    meta = pool["metadata"]
    spec = AgentSessionSpec.model_validate(
        {**template.model_dump(by_alias=True, exclude_none=True), "tenant": {"org": org, "user": POOL_USER}})
    return Session(member, meta["namespace"], meta["uid"], spec, member=member)


def pool_labels(pool_name: str, template: str) -> dict[str, str]:
    return {naming.MANAGED_BY: naming.MANAGER, naming.POOL_LABEL: naming.label_value(pool_name),
            naming.TEMPLATE_HASH_LABEL: template}


def pool_token() -> str:
    """A member's runner token (base64): its runner waits until the claim replaces it."""
    return base64.b64encode(f"{naming.POOL_TOKEN_PREFIX}{secrets.token_urlsafe(24)}".encode()).decode()


def is_pool_token(encoded: str | None) -> bool:
    try:
        return bool(encoded) and base64.b64decode(encoded).startswith(naming.POOL_TOKEN_PREFIX.encode())
    except ValueError:
        return False


def owned_by_pool(manifest: dict[str, Any], pool: dict[str, Any], template: str) -> dict[str, Any]:
    """A child rebuilt as the pool's: its labels and owner, no session's."""
    meta = pool["metadata"]
    owner = {"apiVersion": agentsessionpool.API_VERSION, "kind": agentsessionpool.KIND, "name": meta["name"],
             "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
    return {**manifest, "metadata": {**manifest["metadata"], "labels": pool_labels(meta["name"], template),
                                     "ownerReferences": [owner]}}


def handover(session: Session, pool_name: str, desired_pod: dict[str, Any],
             resource_version: str | None) -> dict[str, Any]:
    """The merge patch that makes a member's pod the session's: its labels, sole owner, spec hash and
    config hash (of the session's ConfigMap and Secret, which the claim writes next). It keeps the pool's
    name in CLAIMED_FROM_LABEL (claimed counts), and is made on the version the claimant read (None: the
    pod is the session's already), so that of two sessions claiming one member only one wins. The
    member's other children change hands by server-side apply of the session's own (the pool applied them
    with the same field manager, so the pool's labels and owner go)."""
    labels: dict[str, Any] = {**session.labels, naming.POOL_LABEL: None, naming.TEMPLATE_HASH_LABEL: None,
                              naming.CLAIMED_FROM_LABEL: naming.label_value(pool_name)}
    hashes = {key: desired_pod["metadata"]["annotations"][key]
              for key in (naming.CONFIG_HASH_ANNOTATION, naming.SPEC_HASH_ANNOTATION)}
    meta: dict[str, Any] = {"labels": labels, "ownerReferences": [session.owner_reference()],
                            "annotations": hashes}
    if resource_version is not None:
        meta["resourceVersion"] = resource_version
    return {"metadata": meta}


def namespace_selector(selector: NamespaceSelector) -> str:
    """The tenant namespaces a ClusterAgentSessionPool selects, as a labelSelector query: the tenant label
    and the pool's requirements."""
    terms = [naming.TENANT_LABEL, *(f"{key}={value}" for key, value in sorted(selector.match_labels.items()))]
    for requirement in selector.match_expressions:
        key, values = requirement.key, ",".join(requirement.values)
        terms.append({"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})", "Exists": key,
                      "DoesNotExist": f"!{key}"}[requirement.operator])
    return ",".join(terms)


def kept_pool(cluster_pool: dict[str, Any], spec: ClusterAgentSessionPoolSpec,
              namespace: str) -> dict[str, Any]:
    """The AgentSessionPool a ClusterAgentSessionPool keeps in one tenant namespace: its name, replicas and
    template, owned by it."""
    meta = cluster_pool["metadata"]
    owner = {"apiVersion": clusteragentsessionpool.API_VERSION, "kind": clusteragentsessionpool.KIND,
             "name": meta["name"], "uid": meta["uid"], "controller": True, "blockOwnerDeletion": True}
    return {"apiVersion": agentsessionpool.API_VERSION, "kind": agentsessionpool.KIND,
            "metadata": {"name": meta["name"], "namespace": namespace, "ownerReferences": [owner],
                         "labels": {naming.MANAGED_BY: naming.MANAGER,
                                    naming.CLUSTER_POOL_LABEL: naming.label_value(meta["name"])}},
            "spec": {"replicas": spec.replicas,
                     "template": spec.template.model_dump(by_alias=True, exclude_none=True)}}
