"""MCP configurations: rows with sealed credentials, each synced to an MCPServer plus a Secret in the
org's tenant namespace; and a probe that connects to a server and lists its tools.

Admins write their org's configurations, members read them. Credentials (bearer token, secret header
values, stdio environment) are write-only: stored encrypted, rendered only into the Secret, and answered
as "set or not". A Kubernetes write that fails takes the database change back with it (the transaction
rolls back) and restores what was in the namespace before; the audit row then says `failed`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Iterator
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import asyncpg
import httpx  # the client library underneath FastMCP's HTTP transports
from fastapi import APIRouter, Depends, Request, Response
from fastmcp import Client  # with the module: a first import inside the route stalls the event loop
from fastmcp.client.transports import SSETransport, StreamableHttpTransport
from pydantic import AfterValidator, Field, StringConstraints, model_validator

from agentbox.api import egress, mcp_sync
from agentbox.api.app import Services, services
from agentbox.api.audit import scrub
from agentbox.api.auth import Principal, org_admin, tenant_member
from agentbox.api.crypto import DecryptionError
from agentbox.api.kube import Kube, KubeError, tenant_namespace
from agentbox.api.mcp_sync import Configuration, Credentials, InvalidConfiguration
from agentbox.api.problems import FieldError, ProblemError, not_found, problem_responses
from agentbox.api.routers.common import (
    AuditedRoute,
    audit_details,
    audit_target,
    audited_transaction,
    database,
    key_ring,
    kube,
    tenant_kube_problem,
)
from agentbox.api.routers.models import ApiModel, invalid_field
from agentbox.crds.fields import DnsLabel, Duration, ToolFilter, parse_duration
from agentbox.crds.mcpserver import HeaderName, HeaderValue, Transport, not_reserved_header

router = APIRouter(prefix="/api/v1/mcp", tags=["mcp"], route_class=AuditedRoute)
log = logging.getLogger("agentbox.api.mcp")

Url = Annotated[str, StringConstraints(pattern=r"^https?://[^\s]+$", max_length=2048)]
# Secret header names become Secret keys (`header-<name>`), so they keep to the characters keys allow.
SecretHeaderName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128),
                             AfterValidator(not_reserved_header)]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)]
Token = Annotated[str, StringConstraints(min_length=1, max_length=8192)]
AuthType = Literal["none", "bearer", "oauth"]
WRITE_ONLY = "Write-only: stored encrypted, never returned."


class PlainHeader(ApiModel):
    name: HeaderName
    value: HeaderValue


class HeaderView(ApiModel):
    """A stored header as answered: rows written before today's header rules still read back."""

    name: str
    value: str


class StdioCommand(ApiModel):
    """The command of a stdio server (its environment is a credential: `stdioEnv`)."""

    command: Annotated[str, StringConstraints(min_length=1, max_length=1024)]
    args: list[Annotated[str, StringConstraints(max_length=4096)]] = Field(default_factory=list,
                                                                           max_length=64)


def _timeout_seconds(timeout: str) -> int:
    seconds = parse_duration(timeout).total_seconds()
    if seconds != int(seconds) or not mcp_sync.MIN_TIMEOUT_SECONDS <= seconds <= mcp_sync.MAX_TIMEOUT_SECONDS:
        raise ValueError(f"timeout must be whole seconds from {mcp_sync.MIN_TIMEOUT_SECONDS}s to "
                         f"{mcp_sync.MAX_TIMEOUT_SECONDS}s")
    return int(seconds)


class ConfigurationBody(ApiModel):
    """A configuration as written. On PUT, a credential field left out keeps its stored value and
    `null` removes it."""

    model_config = ApiModel.model_config | {"json_schema_extra": {"examples": [
        {"name": "github", "transport": "streamable-http", "url": "https://api.githubcopilot.com/mcp/",
         "authType": "bearer", "bearerToken": "<token>", "tools": {"deny": ["delete_repository"]}},
        {"name": "tickets", "transport": "stdio", "stdio": {"command": "npx", "args": ["-y", "mcp-tickets"]},
         "stdioEnv": {"TICKETS_API_KEY": "<key>"}, "timeout": "60s"}]}}

    name: DnsLabel = Field(description="Names the MCPServer; tools appear to agents as <name>_<tool>.")
    description: Annotated[str, StringConstraints(max_length=1024)] = ""
    transport: Transport
    url: Url | None = Field(None, description="streamable-http and sse only.")
    stdio: StdioCommand | None = Field(None, description="stdio only.")
    auth_type: AuthType = "none"
    headers: list[PlainHeader] = Field(default_factory=list, max_length=32,
                                       description="Headers whose values are not secret.")
    tools: ToolFilter = Field(default_factory=ToolFilter)
    timeout: Duration = Field("30s", description="Whole seconds, 1s to 600s.")
    bearer_token: Token | None = Field(None, description=f"For authType bearer. {WRITE_ONLY}")
    secret_headers: dict[SecretHeaderName, HeaderValue] | None = Field(
        None, max_length=32, description=f"Header name to secret value. {WRITE_ONLY}")
    stdio_env: dict[EnvName, Annotated[str, StringConstraints(max_length=32768)]] | None = Field(
        None, max_length=64, description=f"Environment of a stdio server. {WRITE_ONLY}")

    @model_validator(mode="after")
    def _becomes_an_mcp_server(self) -> ConfigurationBody:
        try:
            timeout = _timeout_seconds(self.timeout)
        except ValueError as exc:
            raise invalid_field("timeout", str(exc), self.timeout) from None
        config = self.configuration(uuid.UUID(int=0), "validation", timeout)
        try:  # the routes check again once stored credentials are merged in
            mcp_sync.check(config, self.credentials(), token_required=False)
        except InvalidConfiguration as exc:
            raise invalid_field(exc.field, exc.message, None) from None
        return self

    def configuration(self, config_id: uuid.UUID, org: str,
                      timeout_seconds: int | None = None) -> Configuration:
        return Configuration(
            id=config_id, org_id=org, name=self.name, transport=self.transport, description=self.description,
            url=self.url, stdio_command=self.stdio.command if self.stdio else None,
            stdio_args=list(self.stdio.args) if self.stdio else [], auth_type=self.auth_type,
            headers=[header.model_dump() for header in self.headers], tools_allow=list(self.tools.allow),
            tools_deny=list(self.tools.deny),
            timeout_seconds=_timeout_seconds(self.timeout) if timeout_seconds is None else timeout_seconds)

    def credentials(self, stored: Credentials | None = None) -> Credentials:
        """The credentials as sent; with `stored`, fields left out keep the stored values."""
        stored = stored or Credentials()
        given = self.model_fields_set

        def pick(name: str, empty: Any) -> Any:
            value = getattr(self, name) if name in given else getattr(stored, name)
            return empty if value is None else value

        return Credentials(bearer_token=pick("bearer_token", None), secret_headers=pick("secret_headers", {}),
                           stdio_env=pick("stdio_env", {}))


class CredentialsSet(ApiModel):
    bearer_token: bool
    secret_headers: bool
    stdio_env: bool


class ConfigurationView(ApiModel):
    id: uuid.UUID
    name: str
    description: str
    transport: Transport
    url: str | None
    stdio: StdioCommand | None
    auth_type: AuthType
    headers: list[HeaderView]
    tools: ToolFilter
    timeout: str
    credentials: CredentialsSet = Field(description="Which credentials are stored; never their values.")
    status: str
    status_message: str | None
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    version: int


_SUMMARY = ("SELECT id, org_id, name, description, transport, url, stdio_command, stdio_args, auth_type, "
            "has_bearer_token, has_secret_headers, has_stdio_env, headers, tools_allow, tools_deny, "
            "timeout_seconds, status, status_message, created_by, created_at, updated_at, version "
            "FROM mcp_configuration_summaries")


def _view(row: asyncpg.Record, server: dict[str, Any] | None = None) -> ConfigurationView:
    """The configuration as answered; `server` (its MCPServer) supplies the status the operator found."""
    config = Configuration.from_row(row)
    status, message = mcp_sync.configuration_status(row["status"], row["status_message"], config.id, server)
    return ConfigurationView(
        id=config.id, name=config.name, description=config.description, transport=config.transport,
        url=config.url, stdio=StdioCommand(command=config.stdio_command, args=config.stdio_args)
        if config.stdio_command is not None else None, auth_type=config.auth_type,
        headers=[HeaderView(**header) for header in config.headers],
        tools=ToolFilter(allow=config.tools_allow, deny=config.tools_deny),
        timeout=f"{config.timeout_seconds}s",
        credentials=CredentialsSet(bearer_token=row["has_bearer_token"],
                                   secret_headers=row["has_secret_headers"], stdio_env=row["has_stdio_env"]),
        status=status, status_message=message, created_by=row["created_by"],
        created_at=row["created_at"], updated_at=row["updated_at"], version=row["version"])


def _seal(shared: Services, config: Configuration, credentials: Credentials) -> dict[str, str | None]:
    return mcp_sync.seal(None if credentials.empty else key_ring(shared), config, credentials)


@contextlib.contextmanager
def _decrypting(config: Configuration) -> Iterator[None]:
    try:
        yield
    except DecryptionError as exc:
        log.error("stored MCP credentials do not decrypt", extra={"configuration": str(config.id)})
        raise ProblemError(500, "Internal Server Error",
                           "the stored credentials of this configuration cannot be decrypted") from exc


def _unseal(shared: Services, config: Configuration, row: asyncpg.Record) -> Credentials:
    with _decrypting(config):
        return mcp_sync.unseal(key_ring(shared) if mcp_sync.sealed_columns(row) else None, config, row)


async def _for_secret(shared: Services, conn: asyncpg.Connection, config: Configuration,
                      row: asyncpg.Record) -> Credentials:
    """What the configuration's Secret carries (mcp_sync.secret_credentials), errors as problems."""
    oauth_token_possible = config.auth_type == "oauth" and bool(shared.settings.encryption_keys)
    keys = key_ring(shared) if mcp_sync.sealed_columns(row) or oauth_token_possible else None
    with _decrypting(config):
        return await mcp_sync.secret_credentials(conn, keys, config, row)


def _invalid(exc: InvalidConfiguration) -> ProblemError:
    return ProblemError(422, "Unprocessable Content", str(exc),
                        errors=[FieldError(field=f"body.{exc.field}", message=exc.message,
                                           type="value_error")])


def _namespace(shared: Services, principal: Principal) -> str:
    return tenant_namespace(principal.org or "", shared.settings.tenant_namespace_prefix)


class _Undo:
    """Puts the namespace back when the request fails after its Kubernetes writes began, at the commit
    after them included: the configuration's objects go, or `before` (configuration, credentials) returns."""

    def __init__(self, client: Kube, namespace: str) -> None:
        self.client = client
        self.namespace = namespace
        self.config: Configuration | None = None
        self.before: tuple[Configuration, Credentials] | None = None

    async def write(self, config: Configuration, action: Awaitable[None]) -> None:
        self.config = config
        try:
            await action
        except KubeError as exc:
            raise tenant_kube_problem(exc, self.namespace) from exc
        except mcp_sync.ForeignObject as exc:
            raise ProblemError(409, "Conflict", str(exc)) from exc

    async def __aenter__(self) -> _Undo:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None or self.config is None:
            return
        # Best effort: a failure here leaves the operator to report the objects; the request's error stands.
        with contextlib.suppress(KubeError, mcp_sync.ForeignObject):
            if self.before is None:
                await mcp_sync.remove(self.client, self.namespace, self.config)
            else:
                await mcp_sync.apply(self.client, self.namespace, *self.before)


_INSERT = """
INSERT INTO mcp_configurations (id, org_id, name, description, transport, url, stdio_command, stdio_args,
                                auth_type, bearer_token_enc, secret_headers_enc, stdio_env_enc, headers,
                                tools_allow, tools_deny, timeout_seconds, created_by)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13::jsonb, $14, $15, $16, $17)
"""
_UPDATE = """
UPDATE mcp_configurations SET description = $2, transport = $3, url = $4, stdio_command = $5,
       stdio_args = $6::jsonb, auth_type = $7, bearer_token_enc = $8, secret_headers_enc = $9,
       stdio_env_enc = $10, headers = $11::jsonb, tools_allow = $12, tools_deny = $13, timeout_seconds = $14,
       status = CASE WHEN status = 'needs-reauth' THEN status ELSE 'pending' END,
       status_message = CASE WHEN status = 'needs-reauth' THEN status_message END
 WHERE id = $1
"""


def _columns(config: Configuration, sealed: dict[str, str | None]) -> list[Any]:
    return [config.description, config.transport, config.url, config.stdio_command,
            json.dumps(config.stdio_args), config.auth_type, sealed[mcp_sync.BEARER_COLUMN],
            sealed[mcp_sync.HEADERS_COLUMN], sealed[mcp_sync.ENV_COLUMN], json.dumps(config.headers),
            config.tools_allow, config.tools_deny, config.timeout_seconds]


async def _summary(conn: asyncpg.Connection, config_id: uuid.UUID) -> asyncpg.Record:
    row = await conn.fetchrow(f"{_SUMMARY} WHERE id = $1", config_id)
    if row is None:
        raise not_found("MCP configuration", str(config_id))
    return row


async def _locked(conn: asyncpg.Connection, config_id: uuid.UUID) -> asyncpg.Record:
    """The row with its ciphertext, locked; row security makes another org's id look missing."""
    row = await conn.fetchrow("SELECT * FROM mcp_configurations WHERE id = $1 FOR UPDATE", config_id)
    if row is None:
        raise not_found("MCP configuration", str(config_id))
    return row


@router.post("/configurations", status_code=201, response_model=ConfigurationView,
             name="mcp.configuration.create",
             responses=problem_responses(400, 401, 403, 409, 413, 422, 502, 503))
async def create_configuration(body: ConfigurationBody, request: Request,
                               principal: Principal = Depends(org_admin),
                               shared: Services = Depends(services),
                               client: Kube = Depends(kube)) -> ConfigurationView:
    config = body.configuration(uuid.uuid4(), principal.org or "")
    credentials = body.credentials()
    audit_target(request, f"mcp_configuration/{config.id}", name=config.name, transport=config.transport)
    try:
        mcp_sync.check(config, credentials)
    except InvalidConfiguration as exc:
        raise _invalid(exc) from exc
    sealed = _seal(shared, config, credentials)
    async with _Undo(client, _namespace(shared, principal)) as undo, \
            audited_transaction(request, principal) as conn:
        try:
            await conn.execute(_INSERT, config.id, config.org_id, config.name, *_columns(config, sealed),
                               principal.sub)
        except asyncpg.UniqueViolationError as exc:
            raise ProblemError(409, "Conflict", f"an MCP configuration named {config.name!r} exists") from exc
        row = await _summary(conn, config.id)
        delivered = await _for_secret(shared, conn, config, await _locked(conn, config.id))
        await undo.write(config, mcp_sync.apply(client, undo.namespace, config, delivered))
    return _view(row)


async def _servers(shared: Services, principal: Principal,
                   name: str | None = None) -> dict[str, dict[str, Any]]:
    """The org's MCPServers by name (only `name` when given): from the watch cache when it is synced, else
    read live; {} when Kubernetes cannot say (the stored status is answered then)."""
    namespace = _namespace(shared, principal)
    cache = shared.mcp_servers_cache
    if cache is not None and cache.synced:
        found = [cache.get(namespace, name)] if name else cache.items(namespace)
    elif shared.kube is not None:
        try:
            found = [await shared.kube.get_mcp_server(namespace, name)] if name \
                else await shared.kube.list_mcp_servers(namespace)
        except KubeError:
            log.warning("could not read the MCPServers' status", extra={"namespace": namespace})
            found = []
    else:
        found = []
    return {server["metadata"]["name"]: server for server in found if server is not None}


@router.get("/configurations", response_model=list[ConfigurationView],
            responses=problem_responses(401, 403, 503))
async def list_configurations(request: Request, principal: Principal = Depends(tenant_member),
                              shared: Services = Depends(services)) -> list[ConfigurationView]:
    async with audited_transaction(request, principal) as conn:
        rows = await conn.fetch(f"{_SUMMARY} ORDER BY name")
    servers = await _servers(shared, principal) if rows else {}
    return [_view(row, servers.get(row["name"])) for row in rows]


@router.get("/configurations/{configuration_id}", response_model=ConfigurationView,
            responses=problem_responses(401, 403, 404, 422, 503))
async def get_configuration(configuration_id: uuid.UUID, request: Request,
                            principal: Principal = Depends(tenant_member),
                            shared: Services = Depends(services)) -> ConfigurationView:
    async with audited_transaction(request, principal) as conn:
        row = await _summary(conn, configuration_id)
    return _view(row, (await _servers(shared, principal, row["name"])).get(row["name"]))


@router.put("/configurations/{configuration_id}", response_model=ConfigurationView,
            name="mcp.configuration.update",
            responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 502, 503))
async def update_configuration(configuration_id: uuid.UUID, body: ConfigurationBody, request: Request,
                               principal: Principal = Depends(org_admin),
                               shared: Services = Depends(services),
                               client: Kube = Depends(kube)) -> ConfigurationView:
    audit_target(request, f"mcp_configuration/{configuration_id}", name=body.name, transport=body.transport)
    async with _Undo(client, _namespace(shared, principal)) as undo, \
            audited_transaction(request, principal) as conn:
        current = await _locked(conn, configuration_id)
        if current["name"] != body.name:
            raise ProblemError(422, "Unprocessable Content", "the name of a configuration cannot change",
                               errors=[FieldError(field="body.name", type="value_error",
                                                  message=f"is {current['name']!r}; delete and recreate "
                                                          "to rename it")])
        before_config = Configuration.from_row(current)
        config = body.configuration(configuration_id, before_config.org_id)
        credentials = body.credentials(_unseal(shared, before_config, current))
        try:
            mcp_sync.check(config, credentials)
        except InvalidConfiguration as exc:
            raise _invalid(exc) from exc
        undo.before = (before_config, await _for_secret(shared, conn, before_config, current))
        await conn.execute(_UPDATE, config.id, *_columns(config, _seal(shared, config, credentials)))
        row = await _summary(conn, config.id)
        delivered = await _for_secret(shared, conn, config, await _locked(conn, config.id))
        await undo.write(config, mcp_sync.apply(client, undo.namespace, config, delivered))
    return _view(row)


@router.delete("/configurations/{configuration_id}", status_code=204, response_class=Response,
               name="mcp.configuration.delete",
               responses=problem_responses(401, 403, 404, 409, 422, 502, 503))
async def delete_configuration(configuration_id: uuid.UUID, request: Request,
                               principal: Principal = Depends(org_admin),
                               shared: Services = Depends(services),
                               client: Kube = Depends(kube)) -> Response:
    audit_target(request, f"mcp_configuration/{configuration_id}")
    async with _Undo(client, _namespace(shared, principal)) as undo, \
            audited_transaction(request, principal) as conn:
        current = await _locked(conn, configuration_id)
        config = Configuration.from_row(current)
        audit_target(request, f"mcp_configuration/{configuration_id}", name=config.name)
        undo.before = (config, await _for_secret(shared, conn, config, current))
        await conn.execute("DELETE FROM mcp_configurations WHERE id = $1", configuration_id)
        await undo.write(config, mcp_sync.remove(client, undo.namespace, config))
    return Response(status_code=204)


# Connection test -------------------------------------------------------------------------------------

class ConnectionTest(ApiModel):
    """Either a saved configuration (`configurationId`, with its stored credentials) or a server given
    here. Only streamable-http and sse servers: stdio servers start inside each session's gateway."""

    configuration_id: uuid.UUID | None = None
    transport: Transport | None = None
    url: Url | None = None
    bearer_token: Token | None = Field(None, description="Sent as `Authorization: Bearer`; never stored.")
    headers: list[PlainHeader] = Field(default_factory=list, max_length=32)
    secret_headers: dict[SecretHeaderName, HeaderValue] | None = Field(None, max_length=32)
    timeout: Duration | None = Field(None, description="Capped by the server's own limit.")

    @model_validator(mode="after")
    def _one_target(self) -> ConnectionTest:
        inline = self.model_fields_set - {"configuration_id"}
        if self.configuration_id is not None and inline:
            raise ValueError(f"give configurationId or a server, not both (also got: "
                             f"{', '.join(sorted(inline))})")
        if self.configuration_id is None and (self.transport is None or (self.transport != "stdio"
                                                                          and self.url is None)):
            raise ValueError("give configurationId, or transport and url")
        return self


class ToolView(ApiModel):
    name: str
    description: str


class ConnectionResult(ApiModel):
    transport: Transport
    url: str
    tools: list[ToolView]
    elapsed_ms: float


def _no_stdio(transport: str) -> None:
    if transport == "stdio":
        message = ("stdio servers run inside each session's gateway and cannot be tested from the API; "
                   "test a streamable-http or sse server")
        raise ProblemError(422, "Unprocessable Content", message,
                           errors=[FieldError(field="body.transport", message=message, type="value_error")])


async def _target(request: Request, principal: Principal, shared: Services,
                  body: ConnectionTest) -> tuple[str, str, Credentials, dict[str, str], float | None]:
    """(transport, url, credentials, plain headers, own timeout) of what to test."""
    if body.configuration_id is None:
        assert body.transport is not None
        _no_stdio(body.transport)
        assert body.url is not None
        credentials = Credentials(bearer_token=body.bearer_token, secret_headers=body.secret_headers or {})
        timeout = parse_duration(body.timeout).total_seconds() if body.timeout else None
        return body.transport, body.url, credentials, {h.name: h.value for h in body.headers}, timeout
    audit_target(request, f"mcp_configuration/{body.configuration_id}")
    async with database(request).tenant(principal.org or "") as conn:
        row = await conn.fetchrow("SELECT * FROM mcp_configurations WHERE id = $1", body.configuration_id)
    if row is None:
        raise not_found("MCP configuration", str(body.configuration_id))
    config = Configuration.from_row(row)
    _no_stdio(config.transport)
    assert config.url is not None
    credentials = _unseal(shared, config, row)
    if config.auth_type == "oauth":
        message = "OAuth configurations are tested through their OAuth connection, not here"
        raise ProblemError(422, "Unprocessable Content", message, errors=[
            FieldError(field="body.configurationId", message=message, type="value_error")])
    try:  # a row stored before today's rules (reserved or unsafe headers) is not sent as it is
        mcp_sync.check(config, credentials)
    except InvalidConfiguration as exc:
        message = f"the stored configuration is invalid ({exc}); update it first"
        raise ProblemError(422, "Unprocessable Content", message, errors=[
            FieldError(field="body.configurationId", message=message, type="value_error")]) from exc
    headers = {header["name"]: header["value"] for header in config.headers}
    return config.transport, config.url, credentials, headers, float(config.timeout_seconds)


async def _pin(url: str, allow_private: bool, field: str) -> egress.Pin:
    """The API itself connects here: resolve the host once, check every address, connect to that one.
    `field` names where the URL came from (body.url, or body.configurationId for a stored one)."""
    host = urlsplit(url).hostname or ""
    try:
        return egress.Pin(host, await egress.resolve_allowed(host, allow_private=allow_private))
    except egress.Unresolvable as exc:
        raise ProblemError(502, "Bad Gateway", f"cannot resolve the MCP server's host {host!r}") from exc
    except egress.RefusedAddress as exc:
        message = f"the MCP server's host {exc}"
        raise ProblemError(422, "Unprocessable Content", message,
                           errors=[FieldError(field=field, message=message, type="value_error")]) from exc


def _timed_out(exc: BaseException) -> bool:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return True
    if isinstance(exc, BaseExceptionGroup):
        return any(_timed_out(inner) for inner in exc.exceptions)
    return exc.__cause__ is not None and _timed_out(exc.__cause__)


def _describe(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return scrub(f"{type(exc).__name__}: {exc}".strip(": "))[:300]


async def list_tools(transport: str, url: str, credentials: Credentials, headers: dict[str, str],
                     seconds: float, pin: egress.Pin) -> list[ToolView]:
    """Connect (to the pinned address only), initialise, list tools, all within `seconds`."""
    transport_class: Any = SSETransport if transport == "sse" else StreamableHttpTransport
    all_headers = {**headers, **credentials.secret_headers}
    connection = transport_class(url, headers=all_headers or None, auth=credentials.bearer_token,
                                 httpx_client_factory=egress.pinned_client_factory(pin))
    async with asyncio.timeout(seconds), Client(connection, timeout=seconds) as client:
        tools = await client.list_tools()
    return [ToolView(name=tool.name, description=(tool.description or "")[:4096]) for tool in tools]


@router.post("/test", response_model=ConnectionResult, name="mcp.test",
             responses=problem_responses(400, 401, 403, 404, 413, 422, 502, 503, 504))
async def test_connection(body: ConnectionTest, request: Request, principal: Principal = Depends(org_admin),
                          shared: Services = Depends(services)) -> ConnectionResult:
    transport, url, credentials, headers, own_timeout = await _target(request, principal, shared, body)
    audit_details(request, url=url, transport=transport)
    pin = await _pin(url, shared.settings.mcp_test_allow_private_networks,
                     "body.url" if body.configuration_id is None else "body.configurationId")
    limit = shared.settings.mcp_test_timeout_seconds
    timeout = min(own_timeout, limit) if own_timeout else limit
    started = time.perf_counter()
    try:
        tools = await list_tools(transport, url, credentials, headers, timeout, pin)
    except Exception as exc:  # any transport, protocol or auth failure of the remote server is its problem
        if _timed_out(exc):
            raise ProblemError(504, "Gateway Timeout",
                               f"the MCP server did not answer within {timeout:g}s") from exc
        raise ProblemError(502, "Bad Gateway",
                           f"could not list the MCP server's tools: {_describe(exc)}") from exc
    elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
    async with audited_transaction(request, principal):  # the success row
        pass
    return ConnectionResult(transport=transport, url=url, tools=tools, elapsed_ms=elapsed_ms)
