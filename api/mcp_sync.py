"""MCP configurations: their sealed credentials, and the MCPServer plus Secret each one becomes.

A row of `mcp_configurations` is the source of truth; the org's tenant namespace holds its rendering:

    MCPServer <name>   the spec, with credentials only referenced (auth.secretRef, headers[].valueFrom)
    Secret    <name>   the credentials: `token`, `header-<header name>`, `env-<VARIABLE>`

Both carry the label agentbox.dev/mcp-configuration=<row id>: an object of that name without our label
is somebody else's and is never overwritten or deleted. The builders are pure (row and credentials in,
spec and Secret data out); `apply` and `remove` do the writing.

What the Secret holds has one answer, `secret_credentials`: the row's own credentials, and for `oauth`
configurations the current access token (from mcp_oauth_tokens) as `Credentials.bearer_token`, under
`token` where auth.secretRef points. Every writer (the configuration routes, the OAuth callback, refresh
and revoke) renders the Secret from it, so none of them drops what another put there.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
from pydantic import ValidationError

from agentbox.api.crypto import CipherContext, KeyRing
from agentbox.api.kube import MCP_CONFIGURATION_LABEL, Kube
from agentbox.crds.fields import ToolFilter
from agentbox.crds.mcpserver import (
    Auth,
    MCPServerSpec,
    SecretEnvVar,
    SecretKeySelector,
    Stdio,
)
from agentbox.crds.naming import NEEDS_REAUTH, OAUTH_ANNOTATION, ORG_LABEL

TABLE = "mcp_configurations"
TOKENS_TABLE = "mcp_oauth_tokens"
BEARER_COLUMN = "bearer_token_enc"
HEADERS_COLUMN = "secret_headers_enc"
ENV_COLUMN = "stdio_env_enc"
TOKEN_KEY = "token"  # noqa: S105 (a key name inside the Secret)
MIN_TIMEOUT_SECONDS, MAX_TIMEOUT_SECONDS = 1, 600  # the table's CHECK


@dataclass(frozen=True)
class Credentials:
    """The secret parts of a configuration, in plaintext: only ever in memory and in the Secret."""

    bearer_token: str | None = None
    secret_headers: Mapping[str, str] = field(default_factory=dict)
    stdio_env: Mapping[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # never print a credential, whatever logs the object
        return (f"Credentials(bearer_token={'set' if self.bearer_token else None}, "
                f"secret_headers={sorted(self.secret_headers)}, stdio_env={sorted(self.stdio_env)})")

    @property
    def empty(self) -> bool:
        return not (self.bearer_token or self.secret_headers or self.stdio_env)


@dataclass(frozen=True)
class Configuration:
    """The non-secret parts of a configuration, as stored."""

    id: uuid.UUID
    org_id: str
    name: str
    transport: str
    description: str = ""
    url: str | None = None
    stdio_command: str | None = None
    stdio_args: list[str] = field(default_factory=list)
    auth_type: str = "none"
    headers: list[dict[str, str]] = field(default_factory=list)
    tools_allow: list[str] = field(default_factory=list)
    tools_deny: list[str] = field(default_factory=list)
    timeout_seconds: int = 30

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Configuration:
        def as_list(value: Any) -> list[Any]:
            return json.loads(value) if isinstance(value, str) else list(value or [])

        return cls(id=row["id"], org_id=row["org_id"], name=row["name"], transport=row["transport"],
                   description=row["description"], url=row["url"], stdio_command=row["stdio_command"],
                   stdio_args=as_list(row["stdio_args"]), auth_type=row["auth_type"],
                   headers=as_list(row["headers"]), tools_allow=list(row["tools_allow"]),
                   tools_deny=list(row["tools_deny"]), timeout_seconds=row["timeout_seconds"])


class InvalidConfiguration(ValueError):
    """The configuration cannot become a valid MCPServer; `field` names the API field at fault."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ForeignObject(Exception):
    """An MCPServer or Secret of the configuration's name exists and is not this configuration's."""


def header_key(name: str) -> str:
    return f"header-{name.lower()}"


def env_key(name: str) -> str:
    return f"env-{name}"


_LEADING_SPEC_FIELD = re.compile(r"spec\.([A-Za-z][\w.]*) ")


def check(config: Configuration, credentials: Credentials, *, token_required: bool = True) -> MCPServerSpec:
    """The MCPServer spec `config` becomes, or InvalidConfiguration naming the field that prevents it.
    `token_required=False` when a bearer token may still come from the stored row (a PUT body)."""
    if not MIN_TIMEOUT_SECONDS <= config.timeout_seconds <= MAX_TIMEOUT_SECONDS:
        raise InvalidConfiguration("timeout", f"must be between {MIN_TIMEOUT_SECONDS}s and "
                                              f"{MAX_TIMEOUT_SECONDS}s")
    if config.auth_type == "bearer" and token_required and not credentials.bearer_token:
        raise InvalidConfiguration("bearerToken", "is required when authType is bearer")
    if credentials.bearer_token and config.auth_type != "bearer":
        raise InvalidConfiguration("bearerToken", "is only used when authType is bearer")
    if credentials.stdio_env and config.transport != "stdio":
        raise InvalidConfiguration("stdioEnv", "is only used when transport is stdio")
    if config.transport != "stdio" and (config.stdio_command is not None or config.stdio_args):
        raise InvalidConfiguration("stdio", "is only used when transport is stdio")
    if config.transport == "stdio" and (config.headers or credentials.secret_headers):
        raise InvalidConfiguration("headers", "HTTP headers do not apply when transport is stdio")
    if config.transport == "stdio" and config.auth_type != "none":
        raise InvalidConfiguration("authType", "must be none when transport is stdio")
    try:
        return server_spec(config, credentials)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = str(error["msg"]).removeprefix("Value error, ")
        # The spec model words its own rules in CRD terms, the field first (spec.url is required...); a
        # rule across fields has no location of its own, so that leading field is the one to name.
        named = _LEADING_SPEC_FIELD.match(message)
        location = ".".join(str(part) for part in error.get("loc", ())) or (
            named.group(1) if named else "body")
        raise InvalidConfiguration(location, message.replace("spec.", "")) from None


def server_spec(config: Configuration, credentials: Credentials) -> MCPServerSpec:
    """The MCPServer spec: credentials referenced by Secret key, never included."""
    secret_ref = None if config.auth_type == "none" else SecretKeySelector(name=config.name, key=TOKEN_KEY)
    # As data, validated with the spec, so an error names its place (headers.<index>.name).
    headers: list[dict[str, Any]] = [{"name": header["name"], "value": header["value"]}
                                     for header in config.headers]
    headers += [{"name": name, "valueFrom": {"secretKeyRef": {"name": config.name, "key": header_key(name)}}}
                for name in sorted(credentials.secret_headers)]
    stdio = None
    if config.transport == "stdio":
        env_from = [SecretEnvVar(name=name,
                                 secret_key_ref=SecretKeySelector(name=config.name, key=env_key(name)))
                    for name in sorted(credentials.stdio_env)]
        stdio = Stdio(command=config.stdio_command or "", args=config.stdio_args, env_from=env_from)
    return MCPServerSpec.model_validate({
        "description": config.description, "transport": config.transport, "url": config.url, "stdio": stdio,
        "auth": Auth(type=config.auth_type, secret_ref=secret_ref), "headers": headers,
        "tools": ToolFilter(allow=config.tools_allow, deny=config.tools_deny),
        "timeout": f"{config.timeout_seconds}s"})


def secret_data(credentials: Credentials) -> dict[str, str]:
    data = {header_key(name): value for name, value in credentials.secret_headers.items()}
    data.update({env_key(name): value for name, value in credentials.stdio_env.items()})
    if credentials.bearer_token:
        data[TOKEN_KEY] = credentials.bearer_token
    return data


def labels(config: Configuration) -> dict[str, str]:
    return {ORG_LABEL: config.org_id, MCP_CONFIGURATION_LABEL: str(config.id)}


def configuration_status(stored: str, stored_message: str | None, config_id: uuid.UUID,
                         server: Mapping[str, Any] | None) -> tuple[str, str | None]:
    """What the API answers as a configuration's status: needs-reauth (the database or the MCPServer's
    annotation) first, else the operator's verdict on the current spec (ready, unreachable, invalid),
    else pending (no MCPServer of ours yet, or not yet probed since the last change)."""
    if stored == NEEDS_REAUTH:
        return stored, stored_message
    if server is None or not _ours(server["metadata"].get("labels"), config_id):
        return "pending", None
    status = server.get("status") or {}
    reason = next((c.get("message") or None for c in status.get("conditions") or []
                   if c.get("type") == "Ready"), None)
    if (server["metadata"].get("annotations") or {}).get(OAUTH_ANNOTATION) == NEEDS_REAUTH:
        authorized = next((c.get("message") for c in status.get("conditions") or []
                           if c.get("type") == "Authorized"), None)
        return NEEDS_REAUTH, authorized or "the OAuth grant needs re-authorisation"
    observed, generation = status.get("observedGeneration"), server["metadata"].get("generation")
    if observed is not None and generation is not None and observed < generation:
        return "pending", "the operator has not probed the latest change yet"
    return (status.get("phase") or "Pending").lower(), reason


# Sealing: one ciphertext per credential column, bound to (org, table, row id, column, key id) --------

def _where(config: Configuration, column: str) -> CipherContext:
    return CipherContext(org_id=config.org_id, table=TABLE, row_id=str(config.id), column=column)


def token_cipher(org: str, configuration_id: uuid.UUID, column: str) -> CipherContext:
    """Where a ciphertext of a configuration's OAuth connection (mcp_oauth_tokens) lives."""
    return CipherContext(org_id=org, table=TOKENS_TABLE, row_id=str(configuration_id), column=column)


def seal(keys: KeyRing | None, config: Configuration, credentials: Credentials) -> dict[str, str | None]:
    """The three credential columns' values (None where there is nothing to store)."""
    plain: dict[str, str | None] = {
        BEARER_COLUMN: credentials.bearer_token,
        HEADERS_COLUMN: json.dumps(dict(credentials.secret_headers)) if credentials.secret_headers else None,
        ENV_COLUMN: json.dumps(dict(credentials.stdio_env)) if credentials.stdio_env else None,
    }
    if keys is None and any(plain.values()):
        raise ValueError("credentials need an encryption key ring")
    return {column: None if text is None else keys.encrypt(text, _where(config, column))  # type: ignore[union-attr]
            for column, text in plain.items()}


def sealed_columns(row: Mapping[str, Any]) -> bool:
    return any(row[column] is not None for column in (BEARER_COLUMN, HEADERS_COLUMN, ENV_COLUMN))


def unseal(keys: KeyRing | None, config: Configuration, row: Mapping[str, Any]) -> Credentials:
    """Decrypt a row's credential columns (raises crypto.DecryptionError if one was tampered with)."""
    if keys is None:
        if sealed_columns(row):
            raise ValueError("credentials need an encryption key ring")
        return Credentials()

    def opened(column: str) -> str | None:
        stored = row[column]
        return None if stored is None else keys.decrypt_text(stored, _where(config, column))

    headers, env = opened(HEADERS_COLUMN), opened(ENV_COLUMN)
    return Credentials(bearer_token=opened(BEARER_COLUMN),
                       secret_headers=json.loads(headers) if headers else {},
                       stdio_env=json.loads(env) if env else {})


async def secret_credentials(conn: asyncpg.Connection, keys: KeyRing | None, config: Configuration,
                             row: Mapping[str, Any]) -> Credentials:
    """What the configuration's Secret carries: the row's credentials and, for oauth, the stored access
    token (none until connected). Reads through `conn`, so it sees that transaction's own writes."""
    credentials = unseal(keys, config, row)
    if config.auth_type != "oauth":
        return credentials
    stored = await conn.fetchval(f"SELECT access_token_enc FROM {TOKENS_TABLE} WHERE configuration_id = $1",  # noqa: S608
                                 config.id)
    if stored is None:
        return credentials
    if keys is None:
        raise ValueError("credentials need an encryption key ring")
    token = keys.decrypt_text(stored, token_cipher(config.org_id, config.id, "access_token_enc"))
    return replace(credentials, bearer_token=token)


# Kubernetes ------------------------------------------------------------------------------------------

def _ours(metadata_labels: Mapping[str, str] | None, config_id: uuid.UUID) -> bool:
    return (metadata_labels or {}).get(MCP_CONFIGURATION_LABEL) == str(config_id)


async def _existing(kube: Kube, namespace: str, name: str) -> list[Mapping[str, str] | None]:
    """The labels of the MCPServer and the Secret of that name that exist."""
    found: list[Mapping[str, str] | None] = []
    server = await kube.get_mcp_server(namespace, name)
    if server is not None:
        found.append(server["metadata"].get("labels"))
    secret = await kube.get_secret(namespace, name)
    if secret is not None:
        found.append(secret.metadata.labels)
    return found


async def _refuse_foreign(kube: Kube, namespace: str, config: Configuration) -> None:
    if not all(_ours(found, config.id) for found in await _existing(kube, namespace, config.name)):
        raise ForeignObject(f"an MCPServer or Secret named {config.name!r} already exists in {namespace} "
                            "and does not belong to this configuration")


async def apply(kube: Kube, namespace: str, config: Configuration, credentials: Credentials) -> None:
    """Create or replace the configuration's MCPServer and Secret (ForeignObject if the name is taken)."""
    await _refuse_foreign(kube, namespace, config)
    spec = server_spec(config, credentials).model_dump(by_alias=True, exclude_none=True, mode="json")
    await kube.apply_mcp_server(namespace, config.name, spec, secret_data(credentials), labels(config))


async def apply_secret(kube: Kube, namespace: str, config: Configuration, credentials: Credentials) -> None:
    """Rewrite only the configuration's Secret (the MCPServer, its annotations and status stay)."""
    await _refuse_foreign(kube, namespace, config)
    await kube.apply_secret(namespace, config.name, secret_data(credentials), labels(config))


async def remove(kube: Kube, namespace: str, config: Configuration) -> None:
    """Delete the configuration's MCPServer and Secret; objects of that name that are not ours stay."""
    if all(_ours(found, config.id) for found in await _existing(kube, namespace, config.name)):
        await kube.delete_mcp_server(namespace, config.name)
