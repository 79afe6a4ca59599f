"""A sandbox's children from its spec and what the spec refers to (MCPServers, their Secrets, the provider
key): read once, then built for any identity. Sessions build theirs from it, and pools their members, so a
member's pod is the very pod a session of the same spec would get (template_hash compares them)."""

import asyncio
from dataclasses import dataclass
from typing import Any

from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.operator.build import mcp
from agentbox.operator.build.common import Session
from agentbox.operator.build.configmap import build_configmap
from agentbox.operator.build.egress import PROVIDER_KEY, egress_config, egress_ports
from agentbox.operator.build.networkpolicy import build_session_policy
from agentbox.operator.build.pod import build_pod, config_hash
from agentbox.operator.build.pvc import build_pvc
from agentbox.operator.build.secret import build_secret
from agentbox.operator.build.service import build_service
from agentbox.operator.kube import Kube
from agentbox.operator.settings import OperatorSettings

CHILD_KINDS = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "NetworkPolicy", "Pod")


@dataclass(frozen=True)
class Rendering:
    """The references of one spec, resolved."""

    settings: OperatorSettings
    mcp: mcp.RenderedMCP
    provider_key: str | None  # base64, as read from its Secret
    key_missing: str | None  # why spec.egress.providerKey could not be read

    def children(self, session: Session, token: str) -> dict[str, dict[str, Any]]:
        """Every child but the pod, by kind; `token` is the runner token, base64."""
        settings = self.settings
        proxy_config = egress_config(session, has_key=self.provider_key is not None,
                                     default_allow=settings.egress_default_allow,
                                     upstreams=settings.provider_upstreams)
        key = {PROVIDER_KEY: self.provider_key} if self.provider_key else {}
        urls = [upstream["url"] for upstream in self.mcp.config["upstreams"] if "url" in upstream]
        return dict(zip(CHILD_KINDS[:-1], [
            build_configmap(session, self.mcp.config, proxy_config),
            build_secret(session, token, {**self.mcp.credentials, **key}), build_pvc(session),
            build_service(session),
            build_session_policy(session, settings.api_namespace, settings.api_pod_labels,
                                 egress_ports(urls))],
            strict=True))

    def pod(self, session: Session, children: dict[str, dict[str, Any]]) -> dict[str, Any]:
        settings = self.settings
        return build_pod(session, image=settings.sandbox_image, pull_policy=settings.image_pull_policy,
                         config_digest=config_hash(children["ConfigMap"], children["Secret"]),
                         runner_resources=settings.runner_resources,
                         gateway_resources=settings.gateway_resources,
                         egress_resources=settings.egress_resources, credential_keys=self.mcp.credentials,
                         provider_key=self.provider_key is not None,
                         runner_image=settings.runner_image(session.spec.agent.runtime),
                         node_selector=settings.session_node_selector,
                         tolerations=settings.session_tolerations)


async def _references(kube: Kube, namespace: str, spec: AgentSessionSpec) -> mcp.RenderedMCP:
    names = [ref.name for ref in spec.mcp_servers]
    found = await asyncio.gather(*(kube.get("MCPServer", namespace, name) for name in names))
    servers = dict(zip(names, found, strict=True))
    secret_names = sorted(mcp.referenced_secrets(servers))
    secrets = await asyncio.gather(*(kube.get("Secret", namespace, name) for name in secret_names))
    data = {name: None if secret is None else (secret.get("data") or {})
            for name, secret in zip(secret_names, secrets, strict=True)}
    return mcp.render(spec.mcp_servers, servers, data)


async def _provider_key(kube: Kube, namespace: str, spec: AgentSessionSpec) -> tuple[str | None, str | None]:
    """(the provider key as base64, why it is missing): (None, None) when the session names none."""
    ref = spec.egress.provider_key
    if ref is None:
        return None, None
    secret = await kube.get("Secret", namespace, ref.name)
    value = ((secret or {}).get("data") or {}).get(ref.key)
    if value:
        return value, None
    where = f"Secret {ref.name} not found" if secret is None else f"Secret {ref.name} has no key {ref.key}"
    return None, f"spec.egress.providerKey: {where}; the sandbox starts once it exists"


async def render(kube: Kube, settings: OperatorSettings, namespace: str, spec: AgentSessionSpec) -> Rendering:
    rendered, (provider_key, key_missing) = await asyncio.gather(_references(kube, namespace, spec),
                                                                 _provider_key(kube, namespace, spec))
    return Rendering(settings, rendered, provider_key, key_missing)
