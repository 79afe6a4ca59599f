"""The one place that talks to the Kubernetes API: reads, server-side apply, deletes, and ownership.

Every write of a child goes through `ensure()`, which classifies the existing object first and never
overwrites an object that someone else owns.
"""

import enum
import json
from dataclasses import dataclass
from typing import Any

import kubernetes_asyncio.client
import kubernetes_asyncio.config
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.crds import agentsession, agentsessionpool, clusteragentsessionpool, mcpserver
from agentbox.operator import naming
from agentbox.operator.settings import FIELD_MANAGER

# kind -> (API prefix, plural, namespaced)
RESOURCES: dict[str, tuple[str, str, bool]] = {
    "Pod": ("/api/v1", "pods", True),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims", True),
    "Service": ("/api/v1", "services", True),
    "ConfigMap": ("/api/v1", "configmaps", True),
    "Secret": ("/api/v1", "secrets", True),
    "ResourceQuota": ("/api/v1", "resourcequotas", True),
    "LimitRange": ("/api/v1", "limitranges", True),
    "Namespace": ("/api/v1", "namespaces", False),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies", True),
    "RoleBinding": ("/apis/rbac.authorization.k8s.io/v1", "rolebindings", True),
    "StorageClass": ("/apis/storage.k8s.io/v1", "storageclasses", False),
    "ClusterKopfPeering": ("/apis/kopf.dev/v1", "clusterkopfpeerings", False),
    "KopfPeering": ("/apis/kopf.dev/v1", "kopfpeerings", True),
    agentsession.KIND: (f"/apis/{agentsession.API_VERSION}", agentsession.PLURAL, True),
    mcpserver.KIND: (f"/apis/{mcpserver.API_VERSION}", mcpserver.PLURAL, True),
    agentsessionpool.KIND: (f"/apis/{agentsessionpool.API_VERSION}", agentsessionpool.PLURAL, True),
    clusteragentsessionpool.KIND: (f"/apis/{clusteragentsessionpool.API_VERSION}",
                                   clusteragentsessionpool.PLURAL, False),
}
OBJECT = {200: "object", 201: "object"}
# Connections per client (ours and kopf's): measured no slower than 100 at 20 sessions/s, and each TLS
# connection holds a 256 KiB buffer.
CONNECTIONS = 16


def resource_path(kind: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural, namespaced = RESOURCES[kind]
    # A namespaced kind without a namespace: every namespace's (a list).
    path = f"{prefix}/namespaces/{namespace}/{plural}" if namespaced and namespace else f"{prefix}/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


def api_status(error: ApiException) -> dict[str, Any]:
    """The Status object the apiserver sent with the error ({} when the body is not one)."""
    try:
        status = json.loads(error.body)
    except (TypeError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def api_message(error: ApiException) -> str:
    return api_status(error).get("message") or str(error.reason)


def resource_version(body: dict[str, Any]) -> int:
    """An object's resourceVersion as a number, to tell the newer of two versions seen (0: unknown)."""
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class Ownership(enum.Enum):
    ABSENT = "absent"
    OURS = "ours"
    ADOPTABLE = "adoptable"  # labelled as ours but without an owner: safe to take over
    FOREIGN = "foreign"


def classify(existing: dict[str, Any] | None, owner_uid: str | None, labels: dict[str, str]) -> Ownership:
    """Whose is the object already at our name? `owner_uid` None: owned by label alone (tenant baseline)."""
    if existing is None:
        return Ownership.ABSENT
    metadata = existing.get("metadata") or {}
    existing_labels = metadata.get("labels") or {}
    controllers = [ref for ref in metadata.get("ownerReferences") or [] if ref.get("controller")]
    ours_by_label = existing_labels.get(naming.MANAGED_BY) == naming.MANAGER and all(
        existing_labels.get(key) == value for key, value in labels.items()
        if key in (naming.SESSION_LABEL, naming.ORG_LABEL))
    if owner_uid is None:
        return Ownership.OURS if ours_by_label and not controllers else Ownership.FOREIGN
    if controllers:
        return Ownership.OURS if controllers[0].get("uid") == owner_uid else Ownership.FOREIGN
    return Ownership.ADOPTABLE if ours_by_label else Ownership.FOREIGN


def describe_owner(existing: dict[str, Any]) -> str:
    metadata = existing.get("metadata") or {}
    controllers = [ref for ref in metadata.get("ownerReferences") or [] if ref.get("controller")]
    if controllers:
        ref = controllers[0]
        return f"owned by {ref.get('kind')} {ref.get('name')} (uid {ref.get('uid')})"
    return "not created by agentbox"


@dataclass(frozen=True)
class Conflict:
    kind: str
    name: str
    reason: str

    @property
    def message(self) -> str:
        return f"{self.kind} {self.name} already exists and is {self.reason}; it was left untouched"


def skip_environment_lookups(client: kubernetes_asyncio.client.ApiClient) -> None:
    """kubernetes_asyncio opens its aiohttp session with trust_env=True, so every request parses ~/.netrc
    in a worker thread and scans proxy variables: measured as a fifth of the operator's CPU under load.
    The apiserver address comes from the kubeconfig or the in-cluster environment, never from a proxy."""
    session = client.rest_client.pool_manager
    if hasattr(session, "_trust_env"):  # aiohttp offers no public setter; the attribute is stable since 3.0
        session._trust_env = False


class Kube:
    """Thin async wrapper over kubernetes_asyncio's ApiClient for plain dict manifests."""

    def __init__(self, client: kubernetes_asyncio.client.ApiClient):
        self.client = client
        skip_environment_lookups(client)

    @classmethod
    async def connect(cls) -> "Kube":
        configuration = kubernetes_asyncio.client.Configuration()
        try:
            kubernetes_asyncio.config.load_incluster_config(client_configuration=configuration)
        except kubernetes_asyncio.config.ConfigException:
            await kubernetes_asyncio.config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = CONNECTIONS
        return cls(kubernetes_asyncio.client.ApiClient(configuration))

    async def close(self) -> None:
        await self.client.close()

    async def _call(self, method: str, path: str, *, body: Any = None,
                    query: list[tuple[str, Any]] | None = None,
                    content_type: str = "application/json") -> dict[str, Any]:
        return await self.client.call_api(
            path, method, query_params=query or [], body=body, auth_settings=["BearerToken"],
            header_params={"Accept": "application/json", "Content-Type": content_type},
            response_types_map=OBJECT, _return_http_data_only=True)

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return await self._call("GET", resource_path(kind, namespace, name))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def list(self, kind: str, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]:
        return (await self.listing(kind, namespace, label_selector)).get("items") or []

    async def listing(self, kind: str, namespace: str | None, label_selector: str = "") -> dict[str, Any]:
        """The list as the apiserver returns it: its metadata.resourceVersion tells how fresh it is."""
        query = [("labelSelector", label_selector)] if label_selector else []
        return await self._call("GET", resource_path(kind, namespace), query=query)

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager (force: the ownership check came first)."""
        metadata = manifest["metadata"]
        return await self._call(
            "PATCH", resource_path(manifest["kind"], metadata.get("namespace"), metadata["name"]),
            body=manifest, content_type="application/apply-patch+yaml",
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")])

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any] | None:
        """Create; None when something already holds the name (409)."""
        try:
            path = resource_path(manifest["kind"], manifest["metadata"].get("namespace"))
            return await self._call("POST", path, body=manifest, query=[("fieldManager", FIELD_MANAGER)])
        except ApiException as error:
            if error.status == 409:
                return None
            raise

    async def delete(self, kind: str, namespace: str | None, name: str, uid: str | None = None,
                     resource_version: str | None = None) -> bool:
        """Delete (only the given incarnation when uid is set); False when already gone. With
        `resource_version`, only that version: a newer one is a 409 ApiException (changed since)."""
        body: dict[str, Any] = {"kind": "DeleteOptions", "apiVersion": "v1",
                                "propagationPolicy": "Background"}
        preconditions = {key: value for key, value in (("uid", uid), ("resourceVersion", resource_version))
                         if value}
        if preconditions:
            body["preconditions"] = preconditions
        try:
            await self._call("DELETE", resource_path(kind, namespace, name), body=body)
            return True
        except ApiException as error:
            if error.status == 404 or (error.status == 409 and resource_version is None):
                return False
            raise

    async def merge_patch(self, kind: str, namespace: str | None, name: str, patch: dict[str, Any],
                          sub: str | None = None) -> dict[str, Any] | None:
        try:
            return await self._call("PATCH", resource_path(kind, namespace, name, sub), body=patch,
                                    content_type="application/merge-patch+json")
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    async def ensure(self, manifest: dict[str, Any], owner_uid: str | None,
                     existing: dict[str, Any] | None = None, *, looked_up: bool = False
                     ) -> dict[str, Any] | Conflict:
        """Apply the manifest unless another owner holds its name (then report, never overwrite)."""
        metadata = manifest["metadata"]
        if not looked_up:
            existing = await self.get(manifest["kind"], metadata.get("namespace"), metadata["name"])
        if classify(existing, owner_uid, metadata.get("labels") or {}) is Ownership.FOREIGN:
            assert existing is not None
            return Conflict(manifest["kind"], metadata["name"], describe_owner(existing))
        return await self.apply(manifest)
