"""The API's Kubernetes writes: tenant namespaces, AgentSessions, MCPServers and their Secrets.

Thin async calls over kubernetes_asyncio, each under a timeout; an apiserver failure becomes KubeError
(status kept) so routers can answer with a problem document.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import re
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.crds import agentsession, mcpserver, naming
from agentbox.crds.naming import (
    RUNNER_TOKEN_KEY,
    SESSION_LABEL,
    TENANT_LABEL,
)

MANAGED_BY = {naming.MANAGED_BY: naming.MANAGER}
MCP_CONFIGURATION_LABEL = "agentbox.dev/mcp-configuration"
_LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")


class KubeError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"Kubernetes answered {status}: {reason}")
        self.status = status
        self.reason = reason


def user_label(sub: str) -> str:
    """A label value for a JWT subject: itself when it already is one, else a slug plus a hash."""
    if _LABEL_VALUE.fullmatch(sub):
        return sub
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", sub).strip("-._")[:40].rstrip("-._")
    digest = hashlib.sha256(sub.encode()).hexdigest()[:12]
    return f"{slug}-{digest}" if slug else f"u-{digest}"


def tenant_namespace(org: str, prefix: str = "tenant-") -> str:
    return f"{prefix}{org}"


class Kube:
    def __init__(self, api: client.ApiClient, *, timeout: float = 10) -> None:
        self.api = api
        self.timeout = timeout
        self.core = client.CoreV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.version = client.VersionApi(api)
        self.authorization = client.AuthorizationV1Api(api)

    @classmethod
    async def connect(cls, *, request_timeout: float = 10) -> Kube:
        """In-cluster configuration inside a pod, else KUBECONFIG (or ~/.kube/config)."""
        configuration = client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            await config.load_kube_config(client_configuration=configuration)
        return cls(client.ApiClient(configuration=configuration), timeout=request_timeout)

    async def close(self) -> None:
        await self.api.close()

    async def _call(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, _request_timeout=self.timeout, **kwargs)
        except ApiException as exc:
            raise KubeError(exc.status or 502, exc.reason or "error") from exc
        except (TimeoutError, aiohttp.ClientError) as exc:  # no answer at all: refused, reset, slow
            raise KubeError(503, f"no answer: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        await self._call(self.version.get_code)

    # Tenant namespaces -------------------------------------------------------------------------------

    async def ensure_tenant_namespace(self, namespace: str, org: str) -> None:
        """Create the namespace, or accept an existing one carrying this org's label."""
        body = client.V1Namespace(metadata=client.V1ObjectMeta(
            name=namespace, labels={**MANAGED_BY, TENANT_LABEL: org}))
        try:
            await self._call(self.core.create_namespace, body)
            return
        except KubeError as exc:
            if exc.status != 409:
                raise
        existing = await self._call(self.core.read_namespace, namespace)
        if (existing.metadata.labels or {}).get(TENANT_LABEL) != org:
            raise KubeError(409, f"namespace {namespace} exists and is not {org}'s tenant namespace")

    async def wait_for_tenant_access(self, namespace: str, seconds: float, interval: float = 0.2) -> bool:
        """Whether the API may write Secrets in the tenant namespace within `seconds`. Its rights
        there come from a RoleBinding the operator adds to a new tenant namespace (the chart grants none
        cluster-wide), so they arrive a moment after the namespace. Asked with a SelfSubjectAccessReview,
        which every identity may make about itself."""
        review = client.V1SelfSubjectAccessReview(spec=client.V1SelfSubjectAccessReviewSpec(
            resource_attributes=client.V1ResourceAttributes(namespace=namespace, verb="create",
                                                            resource="secrets")))
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            answer = await self._call(self.authorization.create_self_subject_access_review, review)
            if answer.status.allowed:
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(interval)

    # AgentSessions -----------------------------------------------------------------------------------

    async def create_session(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._call(self.custom.create_namespaced_custom_object, agentsession.GROUP,
                                agentsession.VERSION, namespace, agentsession.PLURAL, body)

    async def get_session(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self.custom.get_namespaced_custom_object, agentsession.GROUP,
                                    agentsession.VERSION, namespace, agentsession.PLURAL, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_sessions(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        result = await self._call(self.custom.list_namespaced_custom_object, agentsession.GROUP,
                                  agentsession.VERSION, namespace, agentsession.PLURAL,
                                  label_selector=label_selector)
        return result.get("items", [])

    async def patch_session(self, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        # Custom resources take no strategic merge patch (the client's default for a dict): say merge.
        return await self._call(self.custom.patch_namespaced_custom_object, agentsession.GROUP,
                                agentsession.VERSION, namespace, agentsession.PLURAL, name, patch,
                                _content_type="application/merge-patch+json")

    async def delete_session(self, namespace: str, name: str) -> bool:
        return await self._ignore_missing(self.custom.delete_namespaced_custom_object, agentsession.GROUP,
                                          agentsession.VERSION, namespace, agentsession.PLURAL, name)

    async def runner_token(self, namespace: str, session: dict[str, Any]) -> str | None:
        """The session's runner token, read by the name the operator gives the session's Secret (a get,
        not a list, so the API needs no right to list Secrets); only a Secret labelled for this session
        counts (a claimed pool member's Secret is relabelled by the claim)."""
        meta = session["metadata"]
        name = naming.session_child_name(meta["name"], meta.get("annotations"))
        secret = await self.get_secret(namespace, name)
        owner = naming.label_value(meta["name"])
        if secret is None or (secret.metadata.labels or {}).get(SESSION_LABEL) != owner:
            return None
        encoded = (secret.data or {}).get(RUNNER_TOKEN_KEY)
        return base64.b64decode(encoded).decode() if encoded else None

    # MCPServers and their Secrets --------------------------------------------------------------------

    async def apply_mcp_server(self, namespace: str, name: str, spec: dict[str, Any],
                               secret_data: dict[str, str], labels: dict[str, str]) -> None:
        """Create or replace the MCPServer and, when it has credentials, its Secret of the same name."""
        labels = {**labels, **MANAGED_BY}
        await self.apply_secret(namespace, name, secret_data, labels)
        body = {"apiVersion": mcpserver.API_VERSION, "kind": mcpserver.KIND,
                "metadata": {"name": name, "namespace": namespace, "labels": labels}, "spec": spec}
        try:
            await self._call(self.custom.create_namespaced_custom_object, mcpserver.GROUP, mcpserver.VERSION,
                             namespace, mcpserver.PLURAL, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            current = await self._call(self.custom.get_namespaced_custom_object, mcpserver.GROUP,
                                       mcpserver.VERSION, namespace, mcpserver.PLURAL, name)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            # Annotations are others' notes (the OAuth needs-reauth mark among them): a new spec keeps them.
            body["metadata"]["annotations"] = current["metadata"].get("annotations") or {}
            await self._call(self.custom.replace_namespaced_custom_object, mcpserver.GROUP, mcpserver.VERSION,
                             namespace, mcpserver.PLURAL, name, body)

    async def apply_secret(self, namespace: str, name: str, secret_data: dict[str, str],
                           labels: dict[str, str]) -> None:
        """Create or replace the Secret with exactly `secret_data`; no data, no Secret."""
        if not secret_data:
            await self._ignore_missing(self.core.delete_namespaced_secret, name, namespace)
            return
        secret = client.V1Secret(metadata=client.V1ObjectMeta(name=name, labels={**labels, **MANAGED_BY}),
                                 type="Opaque", string_data=secret_data)
        await self._create_or_replace(self.core.create_namespaced_secret, self.core.read_namespaced_secret,
                                      self.core.replace_namespaced_secret, namespace, name, secret)

    async def get_mcp_server(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return await self._call(self.custom.get_namespaced_custom_object, mcpserver.GROUP,
                                    mcpserver.VERSION, namespace, mcpserver.PLURAL, name)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def list_mcp_servers(self, namespace: str) -> list[dict[str, Any]]:
        result = await self._call(self.custom.list_namespaced_custom_object, mcpserver.GROUP,
                                  mcpserver.VERSION, namespace, mcpserver.PLURAL)
        return result.get("items", [])

    async def get_secret(self, namespace: str, name: str) -> client.V1Secret | None:
        try:
            return await self._call(self.core.read_namespaced_secret, name, namespace)
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete_secret(self, namespace: str, name: str) -> None:
        await self._ignore_missing(self.core.delete_namespaced_secret, name, namespace)

    async def delete_mcp_server(self, namespace: str, name: str) -> None:
        await self._ignore_missing(self.custom.delete_namespaced_custom_object, mcpserver.GROUP,
                                   mcpserver.VERSION, namespace, mcpserver.PLURAL, name)
        await self._ignore_missing(self.core.delete_namespaced_secret, name, namespace)

    async def _create_or_replace(self, create: Any, read: Any, replace: Any, namespace: str, name: str,
                                 body: Any) -> None:
        try:
            await self._call(create, namespace, body)
        except KubeError as exc:
            if exc.status != 409:
                raise
            current = await self._call(read, name, namespace)
            body.metadata.resource_version = current.metadata.resource_version
            await self._call(replace, name, namespace, body)

    async def _ignore_missing(self, method: Any, *args: Any) -> bool:
        try:
            await self._call(method, *args)
            return True
        except KubeError as exc:
            if exc.status == 404:
                return False
            raise
