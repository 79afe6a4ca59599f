"""OAuth 2.1 for MCP servers, the client side: discovery, PKCE, state, client registration, token calls.

    discovery = await discover(http, "https://mcp.example.com/mcp", presets)   # RFC 9728 -> RFC 8414 / OIDC
    verifier = new_code_verifier(); challenge = code_challenge(verifier)        # RFC 7636, S256 only
    state = new_state("acme")                                                    # the org travels in it
    url = authorization_url(discovery.metadata.authorization_endpoint, ...)     # resource= (RFC 8707)
    tokens = await exchange_code(http, endpoint, client, code, verifier, redirect_uri, resource)
    tokens = await refresh_tokens(http, endpoint, client, refresh_token, resource)
    await revoke(http, revocation_endpoint, client, token, "refresh_token")     # RFC 7009

Hand-written rather than authlib: PKCE, metadata checks and three form posts are short, and the checks
this needs (issuer equality per URL built, S256 required, resource on every call) are policy either way.
Functions without `http` are pure; the API hands them an egress.checked_client, so every URL a server
names is held to the same address policy as the MCP connection test. Nothing here logs or returns a token
in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from agentbox.api import egress
from agentbox.api.db import InvalidOrgId, check_org_id

TokenAuthMethod = Literal["none", "client_secret_basic", "client_secret_post"]
TOKEN_AUTH_METHODS: tuple[TokenAuthMethod, ...] = ("client_secret_basic", "client_secret_post", "none")
STATE_LIFETIME = timedelta(minutes=10)
MCP_PROTOCOL_VERSION = "2025-11-25"


class OAuthError(Exception):
    """Something about the provider or the flow is wrong; the message is safe to show and to audit."""


class DiscoveryError(OAuthError):
    """The server's metadata is missing, malformed or untrustworthy (wrong issuer, no S256, ...)."""


class ProviderUnavailable(OAuthError):
    """The provider could not be reached, timed out, or answered 5xx. Retrying later may work."""


class AddressRefused(OAuthError):
    """A URL of the flow (the MCP server's, or one its metadata names) resolves to an address the API does
    not contact (egress): loopback or private without the setting, link-local or metadata ever."""


class ProviderError(OAuthError):
    """The provider answered an OAuth error (RFC 6749 §5.2), e.g. invalid_grant."""

    def __init__(self, error: str, description: str | None = None) -> None:
        self.error = error
        self.description = description
        super().__init__(f"the provider answered {error}" + (f": {description}" if description else ""))


# PKCE (RFC 7636) and state ------------------------------------------------------------------------------

def new_code_verifier() -> str:
    """64 characters from the unreserved set (RFC 7636 §4.1 allows 43 to 128)."""
    return secrets.token_urlsafe(48)


def code_challenge(verifier: str) -> str:
    """The S256 challenge: base64url(sha256(verifier)) without padding. No `plain`, ever."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def new_state(org_id: str) -> str:
    """`<org>.<256 random bits>`. The callback arrives without the user's token, so the org in front
    picks the tenant context to look the state up in; the database keeps only the whole state's hash,
    so an edited org finds nothing."""
    return f"{check_org_id(org_id)}.{secrets.token_urlsafe(32)}"


def state_hash(state: str) -> bytes:
    return hashlib.sha256(state.encode()).digest()


def state_org(state: str | None) -> str | None:
    """The org a state names, or None when it is not of our shape."""
    if not state or len(state) > 200:
        return None
    org, dot, rest = state.partition(".")
    if not dot or len(rest) < 43:
        return None
    try:
        return check_org_id(org)
    except InvalidOrgId:
        return None


# Discovery (RFC 9728, RFC 8414, OpenID Connect Discovery) ----------------------------------------------

_AUTH_PARAM = re.compile(r'([A-Za-z0-9_-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]+)')


def bearer_challenge(header: str | None) -> dict[str, str]:
    """The auth-params of the Bearer challenge in a WWW-Authenticate header (RFC 6750 §3), by name."""
    if not header:
        return {}
    match = re.search(r"(?i)(?:^|,)\s*bearer\b", header)
    if match is None:
        return {}
    params: dict[str, str] = {}
    rest = header[match.end():]
    # The next challenge starts with a scheme, then a space, then its first param name and '='.
    end = re.search(r",\s*[A-Za-z0-9_-]+\s+[A-Za-z0-9_-]+\s*=", rest)
    for name, value in _AUTH_PARAM.findall(rest[:end.start()] if end else rest):
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params.setdefault(name.lower(), value)
    return params


def _origin_and_path(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "", "", "")), parts.path.rstrip("/")


def protected_resource_metadata_urls(resource_url: str) -> list[str]:
    """RFC 9728 §3.1: the well-known path inserted before the resource's path, then at the root."""
    origin, path = _origin_and_path(resource_url)
    root = f"{origin}/.well-known/oauth-protected-resource"
    return [root + path, root] if path else [root]


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """RFC 8414 §3.1 first, then OpenID Connect Discovery (path inserted, then appended)."""
    origin, path = _origin_and_path(issuer)
    if not path:
        return [f"{origin}/.well-known/oauth-authorization-server",
                f"{origin}/.well-known/openid-configuration"]
    return [f"{origin}/.well-known/oauth-authorization-server{path}",
            f"{origin}/.well-known/openid-configuration{path}",
            f"{origin}{path}/.well-known/openid-configuration"]


def check_endpoint_url(url: str, what: str) -> str:
    """https, or http to a loopback address (a local provider); no fragments, no credentials in it."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment or parts.username:
        raise DiscoveryError(f"{what} {url!r} is not an absolute http(s) URL without fragment or userinfo")
    if parts.scheme == "http" and not _is_loopback(parts.hostname):
        raise DiscoveryError(f"{what} {url!r} must use https")
    return url


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProtectedResource(BaseModel):
    """RFC 9728 §2, the fields used here."""

    model_config = ConfigDict(extra="ignore")

    resource: str
    authorization_servers: list[str] = Field(min_length=1)
    scopes_supported: list[str] = Field(default_factory=list)


class ServerMetadata(BaseModel):
    """RFC 8414 §2 (and the OpenID Connect equivalents), the fields used here."""

    model_config = ConfigDict(extra="ignore")

    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    registration_endpoint: str | None = None
    revocation_endpoint: str | None = None
    code_challenge_methods_supported: list[str] | None = None
    token_endpoint_auth_methods_supported: list[str] = Field(default_factory=lambda: ["client_secret_basic"])
    scopes_supported: list[str] = Field(default_factory=list)
    authorization_response_iss_parameter_supported: bool = False


def check_protected_resource(document: Any, resource_url: str) -> ProtectedResource:
    try:
        metadata = ProtectedResource.model_validate(document)
    except ValidationError as exc:
        raise DiscoveryError(f"the protected-resource metadata is malformed: {_first_error(exc)}") from exc
    # RFC 9728 §3.3 wants the resource identical to the URL asked about; MCP servers often name their
    # origin or a parent path instead, which still designates this server, so a path-prefix match is kept.
    named, asked = metadata.resource.rstrip("/"), resource_url.rstrip("/")
    same_host = urlsplit(named).netloc == urlsplit(asked).netloc
    if not same_host or not (asked == named or asked.startswith(named + "/")):
        raise DiscoveryError(f"the protected-resource metadata names resource {metadata.resource!r}, "
                             f"not {resource_url!r}")
    for server in metadata.authorization_servers:
        check_endpoint_url(server, "authorization server")
    return metadata


def check_server_metadata(document: Any, expected_issuer: str) -> ServerMetadata:
    """The metadata, if its issuer is exactly the one its URL was built from and it offers PKCE S256."""
    try:
        metadata = ServerMetadata.model_validate(document)
    except ValidationError as exc:
        raise DiscoveryError(f"the authorization-server metadata is malformed: {_first_error(exc)}") from exc
    if metadata.issuer != expected_issuer:
        raise DiscoveryError(f"the authorization server's metadata names issuer {metadata.issuer!r}, "
                             f"not {expected_issuer!r}: refused")
    if metadata.code_challenge_methods_supported is None:
        raise DiscoveryError(f"issuer {expected_issuer!r} does not advertise "
                             "code_challenge_methods_supported, so PKCE cannot be relied on: refused")
    if "S256" not in metadata.code_challenge_methods_supported:
        raise DiscoveryError(f"issuer {expected_issuer!r} does not support PKCE S256: refused")
    for name in ("authorization_endpoint", "token_endpoint", "registration_endpoint", "revocation_endpoint"):
        value = getattr(metadata, name)
        if value is not None:
            check_endpoint_url(value, name)
    return metadata


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(part) for part in error['loc']) or 'document'}: {error['msg']}"


class Preset(BaseModel):
    """A provider whose MCP servers do not publish discovery metadata (api/oauth_presets.json)."""

    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True)

    name: str
    hosts: list[str] = Field(min_length=1)
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None = None
    token_endpoint_auth_methods_supported: list[TokenAuthMethod] = Field(min_length=1)
    scopes: list[str] = Field(default_factory=list)
    extra_authorization_params: dict[str, str] = Field(default_factory=dict)
    send_resource: bool = True

    def matches(self, url: str) -> bool:
        host = (urlsplit(url).hostname or "").lower()
        return any(host == known or host.endswith("." + known) for known in self.hosts)

    def metadata(self) -> ServerMetadata:
        return ServerMetadata(
            issuer=self.issuer, authorization_endpoint=self.authorization_endpoint,
            token_endpoint=self.token_endpoint, revocation_endpoint=self.revocation_endpoint,
            code_challenge_methods_supported=["S256"],
            token_endpoint_auth_methods_supported=list(self.token_endpoint_auth_methods_supported))


def sends_resource(issuer: str, presets: list[Preset]) -> bool:
    """Whether to send RFC 8707 `resource` to this issuer: always, unless its preset says it refuses it."""
    return all(preset.send_resource for preset in presets if preset.issuer == issuer)


def load_presets(text: str | None = None) -> list[Preset]:
    """The presets shipped with the API (or parsed from `text`)."""
    if text is None:
        text = resources.files("agentbox.api").joinpath("oauth_presets.json").read_text(encoding="utf-8")
    return [Preset.model_validate(entry) for entry in json.loads(text)["presets"]]


@dataclass(frozen=True)
class Discovery:
    resource: str  # the RFC 8707 resource indicator sent in both requests
    metadata: ServerMetadata
    scopes: list[str]
    preset: str | None = None
    extra_authorization_params: dict[str, str] = field(default_factory=dict)
    send_resource: bool = True


async def discover(http: httpx.AsyncClient, resource_url: str, presets: list[Preset]) -> Discovery:
    """Find the authorization server for an MCP server: the 401's resource_metadata, else the well-known
    paths; then the issuer's metadata. A server with no metadata at all falls back to a matching preset."""
    check_endpoint_url(resource_url, "MCP server URL")
    challenge = bearer_challenge(await _unauthenticated_challenge(http, resource_url))
    candidates = protected_resource_metadata_urls(resource_url)
    if "resource_metadata" in challenge:
        candidates = [check_endpoint_url(challenge["resource_metadata"], "resource_metadata")]
    document = None
    for url in candidates:
        document = await _get_json(http, url)
        if document is not None:
            break
    if document is None:
        preset = next((p for p in presets if p.matches(resource_url)), None)
        if preset is None:
            raise DiscoveryError(f"{resource_url} publishes no protected-resource metadata and matches no "
                                 "provider preset")
        return Discovery(resource=resource_url, metadata=preset.metadata(), scopes=preset.scopes,
                         preset=preset.name, extra_authorization_params=preset.extra_authorization_params,
                         send_resource=preset.send_resource)
    protected = check_protected_resource(document, resource_url)
    issuer = protected.authorization_servers[0]
    metadata = None
    for url in authorization_server_metadata_urls(issuer):
        found = await _get_json(http, url)
        if found is not None:
            metadata = check_server_metadata(found, issuer)
            break
    if metadata is None:
        raise DiscoveryError(f"issuer {issuer!r} publishes no authorization-server metadata")
    scopes = challenge["scope"].split() if challenge.get("scope") else protected.scopes_supported
    return Discovery(resource=protected.resource, metadata=metadata, scopes=scopes)


async def _unauthenticated_challenge(http: httpx.AsyncClient, url: str) -> str | None:
    """The WWW-Authenticate header of an MCP initialize request sent without a token (None if not 401)."""
    body = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": MCP_PROTOCOL_VERSION, "capabilities": {},
                       "clientInfo": {"name": "agentbox", "version": "0.1.0"}}}
    response = await _send(http, "POST", url, "the MCP server", json=body, headers={
        "Accept": "application/json, text/event-stream", "MCP-Protocol-Version": MCP_PROTOCOL_VERSION})
    return response.headers.get("www-authenticate") if response.status_code == 401 else None


async def _get_json(http: httpx.AsyncClient, url: str) -> Any:
    """A metadata document, or None when the server says there is none (4xx)."""
    response = await _send(http, "GET", url, "the metadata document", headers={"Accept": "application/json"})
    if response.status_code >= 500:
        raise ProviderUnavailable(f"{url} answered {response.status_code}")
    if response.status_code != 200:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise DiscoveryError(f"{url} did not answer JSON") from exc


# Clients (pre-registered or RFC 7591) -------------------------------------------------------------------

@dataclass(frozen=True)
class Client:
    client_id: str
    client_secret: str | None
    auth_method: TokenAuthMethod

    def __repr__(self) -> str:  # never print the secret
        return f"Client(client_id={self.client_id!r}, auth_method={self.auth_method!r})"


def choose_auth_method(supported: list[str], has_secret: bool) -> TokenAuthMethod:
    """The strongest method both sides share: a secret in the Authorization header, then in the form,
    then none (a public client, PKCE alone)."""
    for method in TOKEN_AUTH_METHODS:
        if method in supported and (has_secret or method == "none"):
            return method
    raise DiscoveryError(f"no shared token endpoint auth method (the server supports {supported})")


async def register_client(http: httpx.AsyncClient, metadata: ServerMetadata, redirect_uri: str,
                          client_name: str) -> Client:
    """Dynamic client registration (RFC 7591) as a confidential client when the server allows it."""
    if metadata.registration_endpoint is None:
        raise DiscoveryError(f"issuer {metadata.issuer!r} offers no dynamic client registration and no "
                             "client is pre-registered for it (AGENTBOX_OAUTH_CLIENTS)")
    preferred = next((m for m in TOKEN_AUTH_METHODS if m in metadata.token_endpoint_auth_methods_supported),
                     "none")
    request = {"client_name": client_name, "redirect_uris": [redirect_uri],
               "grant_types": ["authorization_code", "refresh_token"], "response_types": ["code"],
               "token_endpoint_auth_method": preferred}
    response = await _send(http, "POST", metadata.registration_endpoint, "the registration endpoint",
                           json=request, headers={"Accept": "application/json"})
    if response.status_code >= 500:
        raise ProviderUnavailable(f"client registration at {metadata.issuer} answered {response.status_code}")
    payload = _json_object(response)
    if response.status_code not in (200, 201) or not isinstance(payload.get("client_id"), str):
        raise _provider_error(payload, f"client registration answered {response.status_code}")
    secret = payload.get("client_secret") if isinstance(payload.get("client_secret"), str) else None
    method = payload.get("token_endpoint_auth_method", preferred)
    if method not in TOKEN_AUTH_METHODS or (method != "none" and secret is None):
        method = "none" if secret is None else "client_secret_basic"
    return Client(payload["client_id"], secret, method)


# Authorization and token requests -----------------------------------------------------------------------

def authorization_url(endpoint: str, *, client_id: str, redirect_uri: str, state: str, challenge: str,
                      resource: str | None, scopes: list[str], extra: dict[str, str] | None = None) -> str:
    """The URL to send the user to: code flow, S256 challenge, RFC 8707 resource, scopes."""
    params = {**(extra or {}), "response_type": "code", "client_id": client_id, "redirect_uri": redirect_uri,
              "state": state, "code_challenge": challenge, "code_challenge_method": "S256"}
    if resource is not None:
        params["resource"] = resource
    if scopes:
        params["scope"] = " ".join(scopes)
    parts = urlsplit(endpoint)
    query = "&".join(filter(None, [parts.query, urlencode(params, quote_via=quote)]))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


class TokenSet(BaseModel):
    """A successful token response (RFC 6749 §5.1)."""

    model_config = ConfigDict(extra="ignore")

    access_token: str = Field(min_length=1, max_length=16_384)
    token_type: str = "Bearer"  # noqa: S105 (the scheme's name)
    expires_in: int | None = Field(None, ge=0)
    refresh_token: str | None = Field(None, max_length=16_384)
    scope: str | None = None

    def __repr__(self) -> str:  # never print the tokens
        return f"TokenSet(token_type={self.token_type!r}, expires_in={self.expires_in}, scope={self.scope!r})"

    __str__ = __repr__

    def expires_at(self, now: datetime) -> datetime | None:
        return now + timedelta(seconds=self.expires_in) if self.expires_in is not None else None


async def exchange_code(http: httpx.AsyncClient, token_endpoint: str, client: Client, *, code: str,
                        verifier: str, redirect_uri: str, resource: str | None) -> TokenSet:
    return await _token_request(http, token_endpoint, client, {
        "grant_type": "authorization_code", "code": code, "code_verifier": verifier,
        "redirect_uri": redirect_uri, **({"resource": resource} if resource else {})})


async def refresh_tokens(http: httpx.AsyncClient, token_endpoint: str, client: Client, *, refresh_token: str,
                         resource: str | None) -> TokenSet:
    return await _token_request(http, token_endpoint, client, {
        "grant_type": "refresh_token", "refresh_token": refresh_token,
        **({"resource": resource} if resource else {})})


async def revoke(http: httpx.AsyncClient, revocation_endpoint: str, client: Client, *, token: str,
                 hint: Literal["access_token", "refresh_token"]) -> None:
    """RFC 7009: 200 means revoked (or already invalid, which is the same to us)."""
    response = await _post_form(http, revocation_endpoint, client, {"token": token, "token_type_hint": hint},
                                what="the revocation endpoint")
    if response.status_code != 200:
        raise _provider_error(_json_object(response), f"token revocation answered {response.status_code}")


async def _token_request(http: httpx.AsyncClient, endpoint: str, client: Client,
                         form: dict[str, str]) -> TokenSet:
    response = await _post_form(http, endpoint, client, form, what="the token endpoint")
    payload = _json_object(response)
    # Some providers (GitHub) answer OAuth errors with 200: the body decides.
    if response.status_code != 200 or "error" in payload:
        raise _provider_error(payload, f"the token endpoint answered {response.status_code}")
    try:
        tokens = TokenSet.model_validate(payload)
    except ValidationError as exc:
        raise ProviderError("invalid_response", f"malformed token response: {_first_error(exc)}") from exc
    if tokens.token_type.lower() != "bearer":
        raise ProviderError("invalid_response", f"token type {tokens.token_type!r} is not Bearer")
    return tokens


async def _post_form(http: httpx.AsyncClient, url: str, client: Client, form: dict[str, str], *,
                     what: str) -> httpx.Response:
    form = dict(form)
    auth = None
    if client.auth_method == "client_secret_basic" and client.client_secret is not None:
        # RFC 6749 §2.3.1: both halves form-urlencoded before Basic encoding.
        auth = httpx.BasicAuth(quote(client.client_id, safe=""), quote(client.client_secret, safe=""))
    else:
        form["client_id"] = client.client_id
        if client.auth_method == "client_secret_post" and client.client_secret is not None:
            form["client_secret"] = client.client_secret
    response = await _send(http, "POST", url, what, data=form, auth=auth,
                           headers={"Accept": "application/json"})
    if response.status_code >= 500:
        raise ProviderUnavailable(f"{what} answered {response.status_code}")
    return response


async def _send(http: httpx.AsyncClient, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
    """One request to a server of the flow; `what` names it in the errors."""
    try:
        return await http.request(method, url, **kwargs)
    except egress.RefusedAddress as exc:
        raise AddressRefused(f"{what} {url} is refused: {exc}") from exc
    except egress.Unresolvable as exc:
        raise ProviderUnavailable(f"{what} {url} could not be reached ({exc})") from exc
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"{what} {url} could not be reached ({type(exc).__name__})") from exc


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        payload = response.json()
    except ValueError:
        return {}
    return payload if isinstance(payload, dict) else {}


def _provider_error(payload: dict[str, Any], fallback: str) -> ProviderError:
    error = payload.get("error")
    description = payload.get("error_description")
    if isinstance(error, str) and re.fullmatch(r"[\x20-\x7e]{1,100}", error):
        return ProviderError(error, description[:300] if isinstance(description, str) else None)
    return ProviderError("invalid_response", fallback)


# Refresh timing and serialisation, rate limits ---------------------------------------------------------

def refresh_due(expires_at: datetime | None, now: datetime, window: timedelta) -> bool:
    """True when the token expires within `window` (a token without expiry never is)."""
    return expires_at is not None and expires_at - now <= window


class TokenBucket:
    """Up to `per_minute` grants a minute, in bursts of as many; refusals are counted, and each grant
    reports how many were refused since the previous one (so a sampled audit trail still says how much
    it left out)."""

    # Hand-written: pyrate-limiter, the maintained option, runs a leak thread and keeps a timestamp per
    # grant, where this needs two floats and a counter.
    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = self.tokens = per_minute
        self.per_second = per_minute / 60
        self.clock = clock
        self.updated = clock()
        self.suppressed = 0

    def take(self) -> int | None:
        """None when no token is left (the refusal is counted), else the count refused since the last
        grant, which starts again at zero."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class KeyedLocks:
    """One asyncio.Lock per key, dropped once nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        async with lock:
            yield
