"""OAuth for MCP servers: connect a configuration on a user's behalf, keep its tokens fresh, revoke them.

- POST /init (org admin): discover, pick a client, store a single-use state, answer the authorization URL.
- GET /callback (the browser, back from the provider): consume the state, exchange the code, store the
  tokens encrypted, copy the access token into the MCPServer's Secret, send the browser to the frontend.
- POST /refresh (org member): refresh when due (or forced), one token call per connection at a time,
  across replicas too (a PostgreSQL advisory lock).
- POST /revoke (org admin): RFC 7009 at the provider, then the stored tokens and the Secret's copy go.
- GET /connections/{configuration_id}: the connection's state, never a token.
A background task refreshes every connection whose token expires within the refresh window.

Only the access token leaves the database, and only into the Secret the MCPServer names
(spec.auth.secretRef); refresh tokens and client secrets stay encrypted in PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

import asyncpg
import httpx
from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import Field

from agentbox.api import audit, egress, mcp_sync, oauth
from agentbox.api.app import Services, services
from agentbox.api.auth import InvalidToken, KeysUnavailable, Principal, org_admin, tenant_member
from agentbox.api.crypto import CipherContext, KeyRing
from agentbox.api.db import Database, DatabaseUnavailable
from agentbox.api.kube import KubeError, tenant_namespace
from agentbox.api.mcp_sync import token_cipher
from agentbox.api.observability import current_request_id
from agentbox.api.problems import FieldError, ProblemError, problem_response, problem_responses, title_for
from agentbox.api.routers.common import (
    AuditedRoute,
    audit_details,
    audit_target,
    audited_transaction,
    background_task,
    database,
    key_ring,
    kube_problem,
)
from agentbox.api.routers.models import ApiModel
from agentbox.crds import mcpserver

log = logging.getLogger("agentbox.api.oauth")
CALLBACK_PATH = "/api/v1/mcp/oauth/callback"
AUTHORIZED_CONDITION = "Authorized"
REFRESHER = "agentbox:oauth-refresher"
Scope = Annotated[str, Field(pattern=r"^[\x21\x23-\x5b\x5d-\x7e]{1,200}$")]  # RFC 6749 scope-token


# Shared per-app helpers ---------------------------------------------------------------------------------



def _http(shared: Services) -> httpx.AsyncClient:
    client = shared.extras.get("oauth_http")
    if client is None:
        # Every URL of the flow comes from a user or a remote server: each request's address is checked
        # (the connection test's policy and setting), and no redirect is followed.
        client = shared.extras["oauth_http"] = egress.checked_client(
            allow_private=shared.settings.mcp_test_allow_private_networks,
            timeout=shared.settings.oauth_http_timeout_seconds)
    return client


def _presets(shared: Services) -> list[oauth.Preset]:
    if "oauth_presets" not in shared.extras:
        shared.extras["oauth_presets"] = oauth.load_presets()
    return shared.extras["oauth_presets"]


def _locks(shared: Services) -> oauth.KeyedLocks:
    return shared.extras.setdefault("oauth_locks", oauth.KeyedLocks())


def _preregistered(shared: Services, issuer: str) -> dict[str, str] | None:
    raw = shared.settings.oauth_clients
    if raw is None:
        return None
    try:
        clients = json.loads(raw.get_secret_value())
    except ValueError:
        log.error("AGENTBOX_OAUTH_CLIENTS is not valid JSON; ignoring it")
        return None
    entry = clients.get(issuer) if isinstance(clients, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("clientId"), str):
        return None
    return entry


def _state_cipher(org: str, state_hash: bytes, column: str) -> CipherContext:
    return CipherContext(org_id=org, table="oauth_states", row_id=state_hash.hex(), column=column)


def _now() -> datetime:
    return datetime.now(UTC)


def _seal(keys: KeyRing, value: str | None, where: CipherContext) -> str | None:
    return keys.encrypt(value, where) if value is not None else None


def _open(keys: KeyRing, stored: str | None, where: CipherContext) -> str | None:
    return keys.decrypt_text(stored, where) if stored is not None else None


def _upstream_problem(exc: oauth.OAuthError) -> ProblemError:
    if isinstance(exc, oauth.ProviderUnavailable):
        return ProblemError(502, "Bad Gateway", f"the OAuth provider is unavailable: {exc}",
                            headers={"Retry-After": "10"})
    if isinstance(exc, oauth.AddressRefused):
        # The configuration leads there (its URL, or what its server's metadata names).
        return ProblemError(422, "Unprocessable Content", str(exc), errors=[
            FieldError(field="body.configurationId", message=str(exc), type="value_error")])
    return ProblemError(502, "Bad Gateway", str(exc))


# The Kubernetes side: the MCPServer's Secret and status -------------------------------------------------

async def _kube_call(kube: Any, method: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return await method(*args, _request_timeout=kube.timeout, **kwargs)
    except ApiException as exc:
        raise KubeError(exc.status or 502, exc.reason or "error") from exc


async def _server(kube: Any, namespace: str, name: str) -> dict[str, Any] | None:
    return await kube.get_mcp_server(namespace, name) if kube is not None else None


async def sync_secret(shared: Services, conn: asyncpg.Connection, org: str,
                      configuration_id: uuid.UUID) -> bool:
    """Render the configuration's Secret again from what `conn` sees (mcp_sync.secret_credentials: its own
    credentials plus the current access token, or none). False when Kubernetes is not configured."""
    if shared.kube is None:
        return False
    row = await conn.fetchrow("SELECT * FROM mcp_configurations WHERE id = $1", configuration_id)
    if row is None:
        return False
    config = mcp_sync.Configuration.from_row(row)
    credentials = await mcp_sync.secret_credentials(conn, key_ring(shared), config, row)
    namespace = tenant_namespace(org, shared.settings.tenant_namespace_prefix)
    try:
        await mcp_sync.apply_secret(shared.kube, namespace, config, credentials)
    except mcp_sync.ForeignObject as exc:
        raise KubeError(409, str(exc)) from exc
    return True


async def mark_server_authorization(kube: Any, namespace: str, server_name: str, *, authorized: bool,
                                    message: str) -> None:
    """Record on the MCPServer whether its OAuth grant holds: an annotation (which survives the operator's
    status writes) and an `Authorized` condition in its status."""
    server = await _server(kube, namespace, server_name)
    if server is None:
        return
    annotation = None if authorized else mcp_sync.NEEDS_REAUTH
    await _kube_call(kube, kube.custom.patch_namespaced_custom_object, mcpserver.GROUP, mcpserver.VERSION,
                     namespace, mcpserver.PLURAL, server_name,
                     {"metadata": {"annotations": {mcp_sync.OAUTH_ANNOTATION: annotation}}},
                     _content_type="application/merge-patch+json")
    conditions = [c for c in (server.get("status") or {}).get("conditions") or []
                  if c.get("type") != AUTHORIZED_CONDITION]
    conditions.append({"type": AUTHORIZED_CONDITION, "status": "True" if authorized else "False",
                       "reason": "Authorized" if authorized else "NeedsReauthorization",
                       "message": message[:1000],
                       "lastTransitionTime": _now().strftime("%Y-%m-%dT%H:%M:%SZ")})
    await _kube_call(kube, kube.custom.patch_namespaced_custom_object_status, mcpserver.GROUP,
                     mcpserver.VERSION, namespace, mcpserver.PLURAL, server_name,
                     {"status": {"conditions": conditions}}, _content_type="application/merge-patch+json")


# Bodies -------------------------------------------------------------------------------------------------

class InitBody(ApiModel):
    configuration_id: uuid.UUID
    scopes: list[Scope] | None = Field(None, max_length=32,
                                       description="Leave out to request what the server asks for.")


class InitView(ApiModel):
    authorization_url: str
    expires_at: datetime
    issuer: str
    resource: str
    scopes: list[str]
    client_registration: Literal["stored", "preregistered", "dynamic"]


class ConnectionBody(ApiModel):
    configuration_id: uuid.UUID


class RefreshBody(ConnectionBody):
    force: bool = Field(False, description="Refresh even when the token is not yet due.")


class ConnectionView(ApiModel):
    configuration_id: uuid.UUID
    status: str
    issuer: str
    resource: str
    scope: str | None
    expires_at: datetime | None
    has_refresh_token: bool
    connected_by: str | None
    updated_at: datetime
    refreshed: bool = False


class RevokeView(ApiModel):
    configuration_id: uuid.UUID
    revoked_at_server: bool
    detail: str


# Routes -------------------------------------------------------------------------------------------------

@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    shared: Services = app.state.services
    refreshing = shared.database is not None and bool(shared.settings.encryption_keys)
    try:
        async with background_task("oauth-refresher", _refresh_loop(shared) if refreshing else None):
            yield
    finally:
        client = shared.extras.pop("oauth_http", None)
        if client is not None:
            await client.aclose()


router = APIRouter(prefix="/api/v1/mcp/oauth", tags=["mcp-oauth"], route_class=AuditedRoute,
                   lifespan=_lifespan)


@dataclass(frozen=True)
class _Configuration:
    id: uuid.UUID
    name: str
    url: str | None
    auth_type: str
    status: str


async def _configuration(conn: asyncpg.Connection, configuration_id: uuid.UUID) -> _Configuration:
    row = await conn.fetchrow("SELECT id, name, url, auth_type, status FROM mcp_configurations WHERE id = $1",
                              configuration_id)
    if row is None:
        raise ProblemError(404, "Not Found", f"MCP configuration {str(configuration_id)!r} not found")
    return _Configuration(**dict(row))


def _redirect_uri(request: Request, shared: Services) -> str:
    base = shared.settings.public_url or str(request.base_url)
    return base.rstrip("/") + CALLBACK_PATH


@router.post("/init", response_model=InitView, name="mcp.oauth.init",
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 502, 503))
async def init(body: InitBody, request: Request, principal: Principal = Depends(org_admin),
               shared: Services = Depends(services)) -> InitView:
    org = principal.org or ""
    audit_target(request, f"mcp_configuration/{body.configuration_id}")
    db, keys = database(request), key_ring(shared)
    async with db.tenant(org) as conn:
        configuration = await _configuration(conn, body.configuration_id)
        stored = await conn.fetchrow("SELECT issuer, client_id, client_secret_enc, token_auth_method "
                                     "FROM mcp_oauth_tokens WHERE configuration_id = $1", configuration.id)
    if configuration.auth_type != "oauth" or configuration.url is None:
        raise ProblemError(409, "Conflict", f"MCP configuration {configuration.name!r} does not use OAuth "
                                            "(auth type oauth over http or sse)")
    http = _http(shared)
    redirect_uri = _redirect_uri(request, shared)
    try:
        discovery = await oauth.discover(http, configuration.url, _presets(shared))
        metadata = discovery.metadata
        registration: Literal["stored", "preregistered", "dynamic"]
        preregistered = _preregistered(shared, metadata.issuer)
        if stored is not None and stored["issuer"] == metadata.issuer:
            registration = "stored"
            client = oauth.Client(stored["client_id"], _open(keys, stored["client_secret_enc"], token_cipher(
                org, configuration.id, "client_secret_enc")), stored["token_auth_method"])
        elif preregistered is not None:
            registration = "preregistered"
            secret = preregistered.get("clientSecret")
            client = oauth.Client(preregistered["clientId"], secret, oauth.choose_auth_method(
                metadata.token_endpoint_auth_methods_supported, secret is not None))
        else:
            registration = "dynamic"
            client = await oauth.register_client(http, metadata, redirect_uri,
                                                 shared.settings.oauth_client_name)
    except oauth.OAuthError as exc:
        raise _upstream_problem(exc) from exc
    scopes = body.scopes if body.scopes is not None else discovery.scopes
    verifier, state = oauth.new_code_verifier(), oauth.new_state(org)
    digest = oauth.state_hash(state)
    expires_at = _now() + oauth.STATE_LIFETIME
    audit_details(request, issuer=metadata.issuer, resource=discovery.resource, preset=discovery.preset,
                  client_registration=registration, scopes=scopes)
    async with audited_transaction(request, principal) as conn:
        await conn.execute(
            "INSERT INTO oauth_states (state_hash, org_id, user_id, configuration_id, issuer, resource, "
            "redirect_uri, code_verifier_enc, expires_at, client_id, client_secret_enc, token_auth_method, "
            "token_endpoint, revocation_endpoint, scope, iss_required) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
            digest, org, principal.sub, configuration.id, metadata.issuer, discovery.resource, redirect_uri,
            keys.encrypt(verifier, _state_cipher(org, digest, "code_verifier_enc")), expires_at,
            client.client_id,
            _seal(keys, client.client_secret, _state_cipher(org, digest, "client_secret_enc")),
            client.auth_method, metadata.token_endpoint, metadata.revocation_endpoint,
            " ".join(scopes) or None, metadata.authorization_response_iss_parameter_supported)
    url = oauth.authorization_url(
        metadata.authorization_endpoint, client_id=client.client_id, redirect_uri=redirect_uri, state=state,
        challenge=oauth.code_challenge(verifier),
        resource=discovery.resource if discovery.send_resource else None, scopes=scopes,
        extra=discovery.extra_authorization_params)
    return InitView(authorization_url=url, expires_at=expires_at, issuer=metadata.issuer,
                    resource=discovery.resource, scopes=scopes, client_registration=registration)


class _CallbackAudit:
    """The callback's one audit row (it is a GET: AuditedRoute leaves it to the route)."""

    def __init__(self, request: Request, principal: Principal | None) -> None:
        self.request = request
        self.principal = principal
        self.written = False

    def _role(self, actor: str | None) -> str | None:
        """The actor's role: the relaying caller's own, else that of the user who started the flow, an
        admin (only org admins may call init)."""
        if actor is None:
            return None
        if self.principal is not None and self.principal.sub == actor:
            return "service_role" if self.principal.is_platform else self.principal.role
        return "admin"

    def event(self, org: str | None, actor: str | None, outcome: audit.Outcome, target: str | None,
              reason: str | None, **details: Any) -> audit.AuditEvent:
        request = self.request
        return audit.AuditEvent(
            org_id=org, action="mcp.oauth.callback", outcome=outcome, actor_sub=actor,
            actor_role=self._role(actor),
            target=target, reason=reason, ip=request.client.host if request.client else None,
            user_agent=request.headers.get("user-agent"), request_id=current_request_id(), details=details)

    async def write(self, where: asyncpg.Connection | Database, event: audit.AuditEvent) -> None:
        try:
            await audit.record(where, event)
            self.written = True
        except (DatabaseUnavailable, asyncpg.PostgresError):
            log.exception("could not write the callback's audit row")


async def _refuse_unusable_state(shared: Services, recorder: _CallbackAudit, principal: Principal | None,
                                 metric_reason: str, why: str, **details: Any) -> None:
    """Audit a callback whose state names no org we issued anything to. A caller whose token names an
    org gets a row in that org's chain. Anyone else (the sender may be anyone with a browser) gets one in
    the platform chain, rationed per replica so a flood cannot grow that chain without limit: rows left
    out are counted in the next one written, and agentbox_api_oauth_callbacks_refused_total counts all."""
    shared.metrics.oauth_callbacks_refused.labels(metric_reason).inc()
    log.info("OAuth callback refused: %s", why, extra={"reason": metric_reason})
    db = shared.database
    if principal is not None and principal.org is not None:
        await recorder.write(db, recorder.event(principal.org, principal.sub, "denied", None, f"400: {why}",
                                                **details))
        return
    rows = shared.extras.get("oauth_stranger_callback_audit")
    if rows is None:
        rows = shared.extras["oauth_stranger_callback_audit"] = oauth.TokenBucket(
            shared.settings.oauth_stranger_callback_audit_per_minute)
    suppressed = rows.take()
    if suppressed is not None:
        await recorder.write(db, recorder.event(None, principal.sub if principal else None, "denied", None,
                                                f"400: {why}", suppressed=suppressed, **details))


async def _optional_principal(request: Request) -> Principal | None:
    """The caller, when the frontend relays the callback with its token; None when the browser comes
    straight from the provider (the state alone then binds the flow)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    verifier = request.app.state.services.verifier
    if scheme.lower() != "bearer" or not token or verifier is None:
        return None
    try:
        return await verifier.verify(token.strip())
    except (InvalidToken, KeysUnavailable) as exc:
        raise ProblemError(401, "Unauthorized", str(exc)) from exc


def _to_frontend(request: Request, shared: Services, outcome: str, status: int, **params: str) -> Response:
    """Where the browser goes next: the frontend with the outcome in the query (never a token). With no
    frontend configured the outcome is the answer itself: JSON, a problem document when it failed."""
    frontend = shared.settings.frontend_url
    if frontend is None:
        if status >= 400:
            return problem_response(request, status, title_for(status), params.get("message"),
                                    extensions={"outcome": outcome, **params})
        return JSONResponse({"outcome": outcome, **params}, status_code=status)
    separator = "&" if "?" in frontend else "?"
    query = urlencode({"oauth": outcome, **params})
    return RedirectResponse(f"{frontend}{separator}{query}", status_code=303)


@router.get("/callback", name="mcp.oauth.callback", response_model=None,
            responses={303: {"description": "To the frontend, with the outcome"},
                       **problem_responses(400, 401, 502, 503)})
async def callback(request: Request, shared: Services = Depends(services),
                   state: Annotated[str | None, Query(max_length=300)] = None,
                   code: Annotated[str | None, Query(max_length=4096)] = None,
                   error: Annotated[str | None, Query(max_length=200)] = None,
                   error_description: Annotated[str | None, Query(max_length=1000)] = None,
                   iss: Annotated[str | None, Query(max_length=2048)] = None) -> Response:
    db, keys, http = database(request), key_ring(shared), _http(shared)
    principal = await _optional_principal(request)
    recorder = _CallbackAudit(request, principal)
    org = oauth.state_org(state)
    if state is None or org is None:
        why = "the state parameter is " + ("missing" if state is None else "malformed")
        await _refuse_unusable_state(shared, recorder, principal, "missing_state", why)
        return problem_response(request, 400, "Bad Request", why)
    digest = oauth.state_hash(state)
    known = None
    async with db.tenant(org) as conn:
        row = await conn.fetchrow("SELECT * FROM oauth_consume_state($1)", digest)
        if row is None or row["state_hash"] is None:
            known = await conn.fetchrow("SELECT user_id, configuration_id, expires_at, consumed_at "
                                        "FROM oauth_states WHERE state_hash = $1", digest)
            row = None
    if row is None:
        if known is None:
            await _refuse_unusable_state(shared, recorder, principal, "unknown_state",
                                         "the state is unknown", claimed_org=org)
            return problem_response(request, 400, "Bad Request", "the state is unknown")
        why = "already used" if known["consumed_at"] is not None else "expired"
        await recorder.write(db, recorder.event(org, known["user_id"], "denied",
                                                f"mcp_configuration/{known['configuration_id']}",
                                                f"400: the state was {why}"))
        return problem_response(request, 400, "Bad Request",
                                f"the state was {why}; start the connection again")
    target = f"mcp_configuration/{row['configuration_id']}"
    user = row["user_id"]

    async def refuse(status: int, detail: str, outcome: audit.Outcome = "denied") -> Response:
        await recorder.write(db, recorder.event(org, principal.sub if principal else user, outcome, target,
                                                f"{status}: {detail}", issuer=row["issuer"]))
        return problem_response(request, status, title_for(status), detail)

    if principal is not None and (principal.org != org or principal.sub != user):
        return await refuse(400, "the state was issued to another user")
    # RFC 9207: iss, when sent, must name the issuer the flow started with; an issuer that promised it
    # always sends it, so its absence means the response may come from a mix-up.
    if iss is not None and iss != row["issuer"]:
        return await refuse(400, "the authorization response came from another issuer (iss mismatch)")
    if iss is None and row["iss_required"]:
        return await refuse(400, "the authorization response lacks iss, which its issuer promises "
                                 "(RFC 9207)")
    configuration_id = str(row["configuration_id"])
    if error is not None:
        reason = f"the provider answered {error}" + (f": {error_description}" if error_description else "")
        await recorder.write(db, recorder.event(org, user, "failed", target, reason[:500],
                                                issuer=row["issuer"]))
        return _to_frontend(request, shared, "error", 502, configuration=configuration_id,
                            error=error[:100], message=reason[:300])
    if not code:
        return await refuse(400, "the code parameter is missing", "failed")
    client = oauth.Client(row["client_id"], _open(keys, row["client_secret_enc"],
                                                  _state_cipher(org, digest, "client_secret_enc")),
                          row["token_auth_method"])
    verifier = keys.decrypt_text(row["code_verifier_enc"], _state_cipher(org, digest, "code_verifier_enc"))
    resource = row["resource"] if oauth.sends_resource(row["issuer"], _presets(shared)) else None
    try:
        tokens = await oauth.exchange_code(http, row["token_endpoint"], client, code=code, verifier=verifier,
                                           redirect_uri=row["redirect_uri"], resource=resource)
    except oauth.OAuthError as exc:
        # RFC 6749's codes; a refused address (the name resolves elsewhere since init) is no outage.
        code_name = (exc.error if isinstance(exc, oauth.ProviderError) else
                     "server_error" if isinstance(exc, oauth.AddressRefused) else "temporarily_unavailable")
        await recorder.write(db, recorder.event(org, user, "failed", target, str(exc)[:500],
                                                issuer=row["issuer"]))
        return _to_frontend(request, shared, "error", 502, configuration=configuration_id,
                            error=code_name, message=str(exc)[:300])
    try:
        await _store_connection(shared, recorder, org, user, row, client, tokens, target)
    except (KubeError, DatabaseUnavailable, ProblemError) as exc:
        reason = "the credential could not be stored or delivered to the cluster"
        if not recorder.written:
            await recorder.write(db, recorder.event(org, user, "failed", target,
                                                    f"{reason} ({type(exc).__name__})"))
        return _to_frontend(request, shared, "error", 503, configuration=configuration_id,
                            error="server_error", message=reason)
    return _to_frontend(request, shared, "connected", 200, configuration=configuration_id)


async def _store_connection(shared: Services, recorder: _CallbackAudit, org: str, user: str,
                            state: asyncpg.Record, client: oauth.Client, tokens: oauth.TokenSet,
                            target: str) -> None:
    """Tokens, configuration status, the Secret's copy and the success row: all or nothing."""
    keys, db = key_ring(shared), shared.database
    configuration_id = state["configuration_id"]
    now = _now()

    def seal(value: str | None, column: str) -> str | None:
        return _seal(keys, value, token_cipher(org, configuration_id, column))

    async with db.tenant(org) as conn:
        configuration = await conn.fetchrow(
            "SELECT name, status FROM mcp_configurations WHERE id = $1 FOR UPDATE", configuration_id)
        if configuration is None:
            raise ProblemError(404, "Not Found", "the MCP configuration was deleted meanwhile")
        await conn.execute(
            "INSERT INTO mcp_oauth_tokens (configuration_id, org_id, issuer, resource, client_id, "
            "client_secret_enc, access_token_enc, refresh_token_enc, token_type, scope, expires_at, "
            "token_auth_method, token_endpoint, revocation_endpoint, connected_by) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'Bearer', $9, $10, $11, $12, $13, $14) "
            "ON CONFLICT (configuration_id) DO UPDATE SET issuer = EXCLUDED.issuer, "
            "resource = EXCLUDED.resource, client_id = EXCLUDED.client_id, "
            "client_secret_enc = EXCLUDED.client_secret_enc, access_token_enc = EXCLUDED.access_token_enc, "
            "refresh_token_enc = EXCLUDED.refresh_token_enc, scope = EXCLUDED.scope, "
            "expires_at = EXCLUDED.expires_at, token_auth_method = EXCLUDED.token_auth_method, "
            "token_endpoint = EXCLUDED.token_endpoint, revocation_endpoint = EXCLUDED.revocation_endpoint, "
            "connected_by = EXCLUDED.connected_by",
            configuration_id, org, state["issuer"], state["resource"], client.client_id,
            seal(client.client_secret, "client_secret_enc"), seal(tokens.access_token, "access_token_enc"),
            seal(tokens.refresh_token, "refresh_token_enc"), tokens.scope or state["scope"],
            tokens.expires_at(now), client.auth_method, state["token_endpoint"], state["revocation_endpoint"],
            user)
        if configuration["status"] == "needs-reauth":
            await conn.execute("UPDATE mcp_configurations SET status = 'pending', status_message = NULL "
                               "WHERE id = $1", configuration_id)
        namespace = tenant_namespace(org, shared.settings.tenant_namespace_prefix)
        synced = await sync_secret(shared, conn, org, configuration_id)
        if synced:
            await mark_server_authorization(shared.kube, namespace, configuration["name"], authorized=True,
                                            message="connected")
        await audit.record(conn, recorder.event(
            org, user, "success", target, None, issuer=state["issuer"], scope=tokens.scope,
            expires_in=tokens.expires_in, has_refresh_token=tokens.refresh_token is not None,
            secret_synced=synced))
    recorder.written = True


# Refresh ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RefreshOutcome:
    row: asyncpg.Record | None  # the token row after the attempt (None when not connected)
    refreshed: bool = False
    needs_reauth: str | None = None  # why, when the grant no longer holds


_CONNECTION = """
SELECT t.configuration_id, t.issuer, t.resource, t.client_id, t.client_secret_enc, t.refresh_token_enc,
       t.scope, t.expires_at, t.token_auth_method, t.token_endpoint, t.revocation_endpoint, t.connected_by,
       t.updated_at, t.version, t.access_token_enc, c.name, c.status
  FROM mcp_oauth_tokens t JOIN mcp_configurations c ON c.id = t.configuration_id
 WHERE t.configuration_id = $1
"""


async def refresh_connection(shared: Services, org: str, configuration_id: uuid.UUID, *, force: bool,
                             store: Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]
                             ) -> RefreshOutcome:
    """Refresh one connection's tokens when due (or forced). Callers for the same connection take turns,
    across replicas too (_refresh_turn); whoever finds the row changed while waiting takes that refresh
    as theirs. `store` opens the transaction that writes the new tokens (and its audit row). Raises
    OAuthError when the provider is down or answers an error other than invalid_grant, which marks the
    configuration needs-reauth; ProblemError 409 when the turn does not come in time."""
    db, keys = shared.database, key_ring(shared)
    async with db.tenant(org) as conn:
        seen = await conn.fetchval("SELECT version FROM mcp_oauth_tokens WHERE configuration_id = $1",
                                   configuration_id)
    if seen is None:
        return RefreshOutcome(None)
    # The in-process lock first: a replica's waiters queue on it, not each on a pooled connection.
    async with (_locks(shared).hold(f"{org}/{configuration_id}"),
                _refresh_turn(shared, org, configuration_id) as turn):
        row = await turn.fetchrow(_CONNECTION, configuration_id)
        if row is None or row["version"] != seen:
            return RefreshOutcome(row)
        window = timedelta(seconds=shared.settings.oauth_refresh_window_seconds)
        if not force and not oauth.refresh_due(row["expires_at"], _now(), window):
            return RefreshOutcome(row)
        refresh_token = _open(keys, row["refresh_token_enc"],
                              token_cipher(org, configuration_id, "refresh_token_enc"))
        if refresh_token is None:
            return await _mark_needs_reauth(shared, org, row, "the provider issued no refresh token")
        client = oauth.Client(row["client_id"], _open(keys, row["client_secret_enc"], token_cipher(
            org, configuration_id, "client_secret_enc")), row["token_auth_method"])
        resource = row["resource"] if oauth.sends_resource(row["issuer"], _presets(shared)) else None
        try:
            tokens = await oauth.refresh_tokens(_http(shared), row["token_endpoint"], client,
                                                refresh_token=refresh_token, resource=resource)
        except oauth.ProviderError as exc:
            if exc.error != "invalid_grant":
                raise
            return await _mark_needs_reauth(shared, org, row, f"the refresh token was refused: {exc}")
        now = _now()
        async with store() as conn:
            # Rotation: a new refresh token replaces the old one; without one, the old one stays valid.
            updated = await conn.fetchrow(
                "UPDATE mcp_oauth_tokens SET access_token_enc = $2, "
                "refresh_token_enc = COALESCE($3, refresh_token_enc), scope = COALESCE($4, scope), "
                "expires_at = $5 WHERE configuration_id = $1 AND version = $6 RETURNING configuration_id",
                configuration_id, keys.encrypt(tokens.access_token, token_cipher(
                    org, configuration_id, "access_token_enc")),
                _seal(keys, tokens.refresh_token, token_cipher(org, configuration_id, "refresh_token_enc")),
                tokens.scope, tokens.expires_at(now), seen)
            if updated is None:
                raise ProblemError(409, "Conflict", "the connection changed during the refresh; retry")
        # Read committed: the turn's next statement sees the tokens just stored.
        row = await turn.fetchrow(_CONNECTION, configuration_id)
        try:
            await sync_secret(shared, turn, org, configuration_id)
        except KubeError:
            # The database holds the new tokens; the Secret catches up at the next refresh or sync.
            log.warning("could not copy the refreshed token into the Secret",
                        extra={"configuration": row["name"]})
    return RefreshOutcome(row, refreshed=True)


# 'OAUR': the advisory-lock class of OAuth refreshes (0004's audit chains use 'AUDT').
_REFRESH_LOCK_CLASS = 0x4F415552


@asynccontextmanager
async def _refresh_turn(shared: Services, org: str,
                        configuration_id: uuid.UUID) -> AsyncIterator[asyncpg.Connection]:
    """A tenant transaction holding this connection's refresh lock, which every replica shares: a
    transaction-level advisory lock, so it ends with the transaction and never stays on a pooled
    connection. Waits at most oauth_refresh_lock_timeout_seconds, then a 409 to retry."""
    wait = shared.settings.oauth_refresh_lock_timeout_seconds
    # 32 of the UUID's random bits: a collision only makes two connections take turns.
    key = int.from_bytes(configuration_id.bytes[:4], "big", signed=True)
    async with shared.database.tenant(org) as conn:
        await conn.execute("SELECT set_config('lock_timeout', $1, true)", f"{round(wait * 1000)}ms")
        try:
            # The statement timeout must outlast the lock's, or asyncpg would cancel it as an outage.
            await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _REFRESH_LOCK_CLASS, key,
                               timeout=wait + 5)
        except asyncpg.LockNotAvailableError as exc:
            raise ProblemError(409, "Conflict", "another refresh of this connection is still running; "
                                                "retry shortly", headers={"Retry-After": "2"}) from exc
        yield conn


async def _mark_needs_reauth(shared: Services, org: str, row: asyncpg.Record, why: str) -> RefreshOutcome:
    async with shared.database.tenant(org) as conn:
        await conn.execute("UPDATE mcp_configurations SET status = 'needs-reauth', status_message = $2 "
                           "WHERE id = $1", row["configuration_id"], why[:2000])
        row = await conn.fetchrow(_CONNECTION, row["configuration_id"])
    namespace = tenant_namespace(org, shared.settings.tenant_namespace_prefix)
    try:
        await mark_server_authorization(shared.kube, namespace, row["name"], authorized=False, message=why)
    except KubeError:
        log.warning("could not mark the MCPServer as needing re-authorisation",
                    extra={"configuration": row["name"]})
    return RefreshOutcome(row, needs_reauth=why)


def _view(row: asyncpg.Record, refreshed: bool = False) -> ConnectionView:
    status = "needs-reauth" if row["status"] == "needs-reauth" else "connected"
    return ConnectionView(configuration_id=row["configuration_id"], status=status, issuer=row["issuer"],
                          resource=row["resource"], scope=row["scope"], expires_at=row["expires_at"],
                          has_refresh_token=row["refresh_token_enc"] is not None,
                          connected_by=row["connected_by"], updated_at=row["updated_at"], refreshed=refreshed)


def _not_connected(configuration_id: uuid.UUID) -> ProblemError:
    return ProblemError(404, "Not Found",
                        f"MCP configuration {str(configuration_id)!r} has no OAuth connection")


@router.post("/refresh", response_model=ConnectionView, name="mcp.oauth.refresh",
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 502, 503))
async def refresh(body: RefreshBody, request: Request, principal: Principal = Depends(tenant_member),
                  shared: Services = Depends(services)) -> ConnectionView:
    org = principal.org or ""
    audit_target(request, f"mcp_configuration/{body.configuration_id}", force=body.force)
    database(request)
    try:
        outcome = await refresh_connection(shared, org, body.configuration_id, force=body.force,
                                           store=lambda: audited_transaction(request, principal))
    except oauth.OAuthError as exc:
        raise _upstream_problem(exc) from exc
    if outcome.row is None:
        raise _not_connected(body.configuration_id)
    if outcome.needs_reauth is not None:
        raise ProblemError(409, "Conflict", f"the connection needs re-authorisation: {outcome.needs_reauth}",
                           extensions={"configurationStatus": "needs-reauth"})
    audit_details(request, refreshed=outcome.refreshed)
    return _view(outcome.row, outcome.refreshed)


@router.get("/connections/{configuration_id}", response_model=ConnectionView,
            responses=problem_responses(401, 403, 404, 422, 503))
async def get_connection(configuration_id: Annotated[uuid.UUID, Path()], request: Request,
                         principal: Principal = Depends(tenant_member)) -> ConnectionView:
    async with database(request).tenant(principal.org or "") as conn:
        row = await conn.fetchrow(_CONNECTION, configuration_id)
    if row is None:
        raise _not_connected(configuration_id)
    return _view(row)


# Revoke -------------------------------------------------------------------------------------------------

@router.post("/revoke", response_model=RevokeView, name="mcp.oauth.revoke",
             responses=problem_responses(400, 401, 403, 404, 409, 413, 422, 502, 503))
async def revoke(body: ConnectionBody, request: Request, principal: Principal = Depends(org_admin),
                 shared: Services = Depends(services)) -> RevokeView:
    org = principal.org or ""
    configuration_id = body.configuration_id
    audit_target(request, f"mcp_configuration/{configuration_id}")
    db, keys = database(request), key_ring(shared)
    async with db.tenant(org) as conn:
        row = await conn.fetchrow(_CONNECTION, configuration_id)
    if row is None:
        raise _not_connected(configuration_id)
    revoked, detail = False, "the provider offers no revocation endpoint; the tokens were deleted here"
    if row["revocation_endpoint"]:
        client = oauth.Client(row["client_id"], _open(keys, row["client_secret_enc"], token_cipher(
            org, configuration_id, "client_secret_enc")), row["token_auth_method"])
        try:
            # The refresh token first: revoking it ends the grant (RFC 7009 §2.1), then the access token.
            refresh_token = _open(keys, row["refresh_token_enc"],
                                  token_cipher(org, configuration_id, "refresh_token_enc"))
            if refresh_token is not None:
                await oauth.revoke(_http(shared), row["revocation_endpoint"], client, token=refresh_token,
                                   hint="refresh_token")
            await oauth.revoke(_http(shared), row["revocation_endpoint"], client,
                               token=keys.decrypt_text(row["access_token_enc"], token_cipher(
                                   org, configuration_id, "access_token_enc")), hint="access_token")
            revoked, detail = True, "revoked at the provider and deleted"
        except oauth.OAuthError as exc:
            detail = f"the provider did not confirm the revocation ({exc}); the tokens were deleted here"
    audit_details(request, revoked_at_server=revoked, issuer=row["issuer"])
    async with audited_transaction(request, principal) as conn:
        await conn.execute("DELETE FROM mcp_oauth_tokens WHERE configuration_id = $1", configuration_id)
        try:
            await sync_secret(shared, conn, org, configuration_id)
        except KubeError as exc:
            raise kube_problem(exc) from exc
    return RevokeView(configuration_id=configuration_id, revoked_at_server=revoked, detail=detail)


# Background refresh -------------------------------------------------------------------------------------

def _background_store(shared: Services, org: str, configuration_id: uuid.UUID
                      ) -> Callable[[], AbstractAsyncContextManager[asyncpg.Connection]]:
    @asynccontextmanager
    async def store() -> AsyncIterator[asyncpg.Connection]:
        async with shared.database.tenant(org) as conn:
            yield conn
            await audit.record(conn, audit.AuditEvent(
                org_id=org, action="mcp.oauth.refresh", outcome="success", actor_sub=REFRESHER,
                actor_role="system", target=f"mcp_configuration/{configuration_id}",
                details={"background": True}))
    return store


async def refresh_due_connections(shared: Services) -> int:
    """One background pass: refresh every connection whose token expires within the window. Returns how
    many were refreshed. A failure on one connection is logged (and audited) and does not stop the pass."""
    db = shared.database
    window = shared.settings.oauth_refresh_window_seconds
    async with db.platform() as conn:
        orgs = [row["id"] for row in await conn.fetch("SELECT id FROM organizations ORDER BY id")]
    refreshed = 0
    for org in orgs:
        async with db.tenant(org) as conn:
            due = await conn.fetch(
                "SELECT t.configuration_id FROM mcp_oauth_tokens t "
                "JOIN mcp_configurations c ON c.id = t.configuration_id "
                "WHERE t.refresh_token_enc IS NOT NULL AND c.status <> 'needs-reauth' "
                "AND t.expires_at <= now() + make_interval(secs => $1)", window)
        for row in due:
            configuration_id = row["configuration_id"]
            try:
                outcome = await refresh_connection(shared, org, configuration_id, force=False,
                                                   store=_background_store(shared, org, configuration_id))
                refreshed += outcome.refreshed
                failure = outcome.needs_reauth
            except (oauth.OAuthError, ProblemError, KubeError) as exc:
                failure = str(exc)
            if failure is not None:
                log.warning("background OAuth refresh failed", extra={"org": org,
                                                                      "configuration": str(configuration_id)})
                await audit.record(db, audit.AuditEvent(
                    org_id=org, action="mcp.oauth.refresh", outcome="failed", actor_sub=REFRESHER,
                    actor_role="system", target=f"mcp_configuration/{configuration_id}",
                    reason=failure[:2000], details={"background": True}))
    return refreshed


async def _refresh_loop(shared: Services) -> None:
    while True:
        try:
            await refresh_due_connections(shared)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the background OAuth refresh pass failed")
        await asyncio.sleep(shared.settings.oauth_refresh_interval_seconds)
