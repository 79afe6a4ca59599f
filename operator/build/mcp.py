"""The gateway's view of a session's MCP servers: gateway.json upstreams plus the credential files.

Everything secret goes into the session Secret as a file; gateway.json only names the files.
"""

import base64
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from agentbox.crds.agentsession import MCPServerRef
from agentbox.crds.conditions import MCPServerPhase, Reason
from agentbox.crds.fields import ToolFilter, parse_duration
from agentbox.crds.mcpserver import MCPServerSpec, SecretKeySelector
from agentbox.operator import naming

SECRETS_DIR = "/var/run/agentbox/secrets"
GATEWAY_HOST = "127.0.0.1"
GATEWAY_PORT = 8765


@dataclass(frozen=True)
class Problem:
    reason: Reason
    message: str


@dataclass
class RenderedMCP:
    """gateway.json content, Secret entries (base64) and what kept servers from being usable."""

    config: dict[str, Any]
    credentials: dict[str, str] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)


def referenced_secrets(servers: dict[str, dict[str, Any] | None]) -> set[str]:
    """Names of the Secrets the given MCPServer objects read credentials from."""
    names = set()
    for body in servers.values():
        spec = (body or {}).get("spec") or {}
        if ref := (spec.get("auth") or {}).get("secretRef"):
            names.add(ref.get("name"))
        for header in spec.get("headers") or []:
            if ref := ((header.get("valueFrom") or {}).get("secretKeyRef")):
                names.add(ref.get("name"))
        for var in (spec.get("stdio") or {}).get("envFrom") or []:
            names.add((var.get("secretKeyRef") or {}).get("name"))
    return {name for name in names if name}


def merge_tools(server: ToolFilter, session: ToolFilter) -> dict[str, list[str]]:
    """Both filters apply: allow lists intersect (empty = all), deny lists add up."""
    if server.allow and session.allow:
        allow = sorted(set(server.allow) & set(session.allow)) or ["-"]  # "-": nothing matches both
    else:
        allow = sorted(server.allow or session.allow)
    return {"allow": allow, "deny": sorted(set(server.deny) | set(session.deny))}


def _secret_value(selector: SecretKeySelector, secrets: dict[str, dict[str, str] | None]) -> str | None:
    data = secrets.get(selector.name)
    return None if data is None else data.get(selector.key)


def render(refs: list[MCPServerRef], servers: dict[str, dict[str, Any] | None],
           secrets: dict[str, dict[str, str] | None]) -> RenderedMCP:
    """Upstreams for every referenced server that exists, is valid and has its credentials.

    `servers` maps a referenced name to the MCPServer object (None when missing); `secrets` maps a
    Secret name to its base64 data (None when missing).
    """
    rendered = RenderedMCP(config={"listen": {"host": GATEWAY_HOST, "port": GATEWAY_PORT}, "upstreams": []})
    for ref in refs:
        body = servers.get(ref.name)
        if body is None:
            rendered.problems.append(Problem(Reason.SERVER_NOT_FOUND, f"MCPServer {ref.name} not found"))
            continue
        try:
            spec = MCPServerSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            rendered.problems.append(Problem(Reason.SERVER_NOT_READY, f"MCPServer {ref.name} is invalid: "
                                                                      f"{error.errors()[0]['msg']}"))
            continue
        credentials: dict[str, str] = {}
        upstream: dict[str, Any] = {"name": ref.name, "transport": spec.transport,
                                    "tools": merge_tools(spec.tools, ref.tools),
                                    "timeoutSeconds": parse_duration(spec.timeout).total_seconds()}
        if spec.transport == "stdio":
            assert spec.stdio is not None
            upstream.update(command=spec.stdio.command, args=spec.stdio.args, env=spec.stdio.env)
        else:
            upstream["url"] = spec.url
        missing: list[str] = []
        if spec.stdio is not None and spec.stdio.env_from:
            env_files = {}
            for var in spec.stdio.env_from:
                key = naming.env_credential_key(ref.name, var.name)
                value = _secret_value(var.secret_key_ref, secrets)
                if value is None:
                    missing.append(f"{var.secret_key_ref.name}/{var.secret_key_ref.key}")
                credentials[key] = value or ""
                env_files[var.name] = f"{SECRETS_DIR}/{key}"
            upstream["envFiles"] = env_files
        auth: dict[str, Any] = {"type": spec.auth.type}
        if spec.auth.secret_ref is not None:
            key = naming.credential_key(ref.name, "token")
            value = _secret_value(spec.auth.secret_ref, secrets)
            if value is None:
                missing.append(f"{spec.auth.secret_ref.name}/{spec.auth.secret_ref.key}")
            credentials[key] = value or ""
            auth["tokenFile"] = f"{SECRETS_DIR}/{key}"
        upstream["auth"] = auth
        headers = []
        for header in spec.headers:
            if header.value_from is None:
                headers.append({"name": header.name, "value": header.value})
                continue
            key = naming.credential_key(ref.name, f"header-{header.name}")
            selector = header.value_from.secret_key_ref
            value = _secret_value(selector, secrets)
            if value is None:
                missing.append(f"{selector.name}/{selector.key}")
            credentials[key] = value or ""
            headers.append({"name": header.name, "valueFile": f"{SECRETS_DIR}/{key}"})
        if headers:
            upstream["headers"] = headers
        if missing:
            rendered.problems.append(Problem(
                Reason.SECRET_NOT_FOUND,
                f"MCPServer {ref.name}: Secret key(s) {', '.join(sorted(missing))} not found"))
            continue
        phase = (body.get("status") or {}).get("phase") or MCPServerPhase.PENDING
        if phase != MCPServerPhase.READY:
            # Still mounted: the gateway reconnects on its own once the server answers.
            rendered.problems.append(Problem(Reason.SERVER_NOT_READY, f"MCPServer {ref.name} is {phase}"))
        rendered.config["upstreams"].append(upstream)
        rendered.credentials.update(credentials)
    return rendered


def encode(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
