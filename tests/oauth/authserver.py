"""A small OAuth 2.1 authorization server and an MCP resource it protects, for the tests (ASGI).

It does what a careful provider does (PKCE S256 checked, `resource` bound to codes and refresh tokens,
refresh-token rotation, RFC 7591 registration, RFC 7009 revocation) and can be told to misbehave: lie
about its issuer, leave out code_challenge_methods_supported, publish metadata only under OpenID paths.
Every call is counted so tests can assert what reached it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route


@dataclass
class Behaviour:
    prm_location: Literal["header", "path", "root"] = "header"
    metadata_kind: Literal["oauth", "openid"] = "oauth"
    lie_about_issuer: bool = False
    pkce_methods: list[str] | None = field(default_factory=lambda: ["S256"])
    registration: bool = True
    rotate_refresh_tokens: bool = True
    access_token_lifetime: int = 3600
    token_delay: float = 0.0
    iss_parameter: bool = True  # RFC 9207: promised in the metadata and sent with every redirect
    # Metadata fields published instead of this server's own (e.g. an endpoint at another address).
    metadata_overrides: dict[str, str] = field(default_factory=dict)
    resource_metadata_url: str | None = None  # the challenge's resource_metadata, instead of /prm


@dataclass
class AuthServer:
    behaviour: Behaviour = field(default_factory=Behaviour)
    base_url: str = ""
    clients: dict[str, dict[str, Any]] = field(default_factory=dict)
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    access_tokens: set[str] = field(default_factory=set)
    refresh_tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: Counter[str] = field(default_factory=Counter)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/as"

    @property
    def resource(self) -> str:
        return f"{self.base_url}/mcp"

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/mcp", self.mcp, methods=["GET", "POST"]),
            Route("/prm", self.protected_resource),
            Route("/.well-known/oauth-protected-resource/mcp", self.protected_resource_at_path),
            Route("/.well-known/oauth-protected-resource", self.protected_resource_at_root),
            Route("/.well-known/oauth-authorization-server/as", self.oauth_metadata),
            Route("/.well-known/openid-configuration/as", self.openid_metadata),
            Route("/as/authorize", self.authorize),
            Route("/as/token", self.token, methods=["POST"]),
            Route("/as/register", self.register, methods=["POST"]),
            Route("/as/revoke", self.revoke, methods=["POST"]),
        ])

    # The protected MCP resource --------------------------------------------------------------------

    async def mcp(self, request: Request) -> Response:
        self.calls["mcp"] += 1
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token in self.access_tokens:
            return JSONResponse({"jsonrpc": "2.0", "id": 1, "result": {}})
        challenge = 'Bearer error="invalid_token"'
        if self.behaviour.prm_location == "header":
            prm = self.behaviour.resource_metadata_url or f"{self.base_url}/prm"
            challenge += f', resource_metadata="{prm}", scope="mcp:tools"'
        return JSONResponse({"error": "unauthorized"}, status_code=401,
                            headers={"WWW-Authenticate": challenge})

    def _prm(self) -> JSONResponse:
        return JSONResponse({"resource": self.resource, "authorization_servers": [self.issuer],
                             "scopes_supported": ["mcp:tools", "mcp:read"]})

    async def protected_resource(self, request: Request) -> Response:
        self.calls["prm"] += 1
        return self._prm() if self.behaviour.prm_location == "header" else Response(status_code=404)

    async def protected_resource_at_path(self, request: Request) -> Response:
        self.calls["prm-path"] += 1
        return self._prm() if self.behaviour.prm_location == "path" else Response(status_code=404)

    async def protected_resource_at_root(self, request: Request) -> Response:
        self.calls["prm-root"] += 1
        return self._prm() if self.behaviour.prm_location == "root" else Response(status_code=404)

    # Metadata --------------------------------------------------------------------------------------

    def _metadata(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "issuer": "https://evil.example" if self.behaviour.lie_about_issuer else self.issuer,
            "authorization_endpoint": f"{self.issuer}/authorize", "token_endpoint": f"{self.issuer}/token",
            "revocation_endpoint": f"{self.issuer}/revoke", "response_types_supported": ["code"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic", "none"],
            "authorization_response_iss_parameter_supported": self.behaviour.iss_parameter}
        if self.behaviour.registration:
            document["registration_endpoint"] = f"{self.issuer}/register"
        if self.behaviour.pkce_methods is not None:
            document["code_challenge_methods_supported"] = self.behaviour.pkce_methods
        return document | self.behaviour.metadata_overrides

    async def oauth_metadata(self, request: Request) -> Response:
        self.calls["oauth-metadata"] += 1
        if self.behaviour.metadata_kind != "oauth":
            return Response(status_code=404)
        return JSONResponse(self._metadata())

    async def openid_metadata(self, request: Request) -> Response:
        self.calls["openid-metadata"] += 1
        if self.behaviour.metadata_kind != "openid":
            return Response(status_code=404)
        return JSONResponse(self._metadata())

    # Endpoints -------------------------------------------------------------------------------------

    async def register(self, request: Request) -> Response:
        self.calls["register"] += 1
        body = await request.json()
        client_id, secret = f"dyn-{secrets.token_hex(4)}", secrets.token_urlsafe(24)
        self.clients[client_id] = {"secret": secret, "redirect_uris": body["redirect_uris"]}
        return JSONResponse({"client_id": client_id, "client_secret": secret,
                             "token_endpoint_auth_method": "client_secret_basic",
                             "redirect_uris": body["redirect_uris"]}, status_code=201)

    async def authorize(self, request: Request) -> Response:
        """Consents at once (the user said yes) and redirects back with a code, state and (RFC 9207) iss."""
        self.calls["authorize"] += 1
        query = request.query_params
        client = self.clients.get(query.get("client_id", ""))
        if client is None or query.get("redirect_uri") not in client["redirect_uris"]:
            return JSONResponse({"error": "invalid_client"}, status_code=400)
        if query.get("code_challenge_method") != "S256" or not query.get("code_challenge"):
            return JSONResponse({"error": "invalid_request", "error_description": "PKCE S256 required"},
                                status_code=400)
        code = secrets.token_urlsafe(16)
        self.codes[code] = {"client_id": query["client_id"], "challenge": query["code_challenge"],
                            "redirect_uri": query["redirect_uri"], "resource": query.get("resource"),
                            "scope": query.get("scope")}
        back = {"code": code, "state": query.get("state", "")}
        if self.behaviour.iss_parameter:
            back["iss"] = self.issuer
        return RedirectResponse(f"{query['redirect_uri']}?{urlencode(back)}", status_code=302)

    def _client(self, request: Request, form: dict[str, str]) -> str | None:
        scheme, _, encoded = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            client_id, _, secret = base64.b64decode(encoded).decode().partition(":")
        else:
            client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        client = self.clients.get(client_id)
        return client_id if client is not None and client["secret"] == secret else None

    def _issue(self, client_id: str, resource: str | None, scope: str | None) -> dict[str, Any]:
        access, refresh = f"at-{secrets.token_urlsafe(24)}", f"rt-{secrets.token_urlsafe(24)}"
        self.access_tokens.add(access)
        self.refresh_tokens[refresh] = {"client_id": client_id, "resource": resource, "scope": scope}
        return {"access_token": access, "token_type": "Bearer", "refresh_token": refresh,
                "expires_in": self.behaviour.access_token_lifetime, "scope": scope}

    async def token(self, request: Request) -> Response:
        self.calls["token"] += 1
        form = {key: str(value) for key, value in (await request.form()).items()}
        self.token_requests.append(form)
        if self.behaviour.token_delay:
            await asyncio.sleep(self.behaviour.token_delay)
        client_id = self._client(request, form)
        if client_id is None:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        if form.get("grant_type") == "authorization_code":
            grant = self.codes.pop(form.get("code", ""), None)
            verifier = form.get("code_verifier", "")
            digest = hashlib.sha256(verifier.encode()).digest()
            challenge = base64.urlsafe_b64encode(digest).decode().rstrip("=")
            if (grant is None or grant["client_id"] != client_id or grant["challenge"] != challenge
                    or grant["redirect_uri"] != form.get("redirect_uri")
                    or grant["resource"] != form.get("resource")):
                return JSONResponse({"error": "invalid_grant"}, status_code=400)
            return JSONResponse(self._issue(client_id, grant["resource"], grant["scope"]))
        if form.get("grant_type") == "refresh_token":
            self.calls["refresh"] += 1
            old = form.get("refresh_token", "")
            grant = self.refresh_tokens.get(old)
            if grant is None or grant["client_id"] != client_id or grant["resource"] != form.get("resource"):
                return JSONResponse({"error": "invalid_grant", "error_description": "unknown refresh token"},
                                    status_code=400)
            issued = self._issue(client_id, grant["resource"], grant["scope"])
            if self.behaviour.rotate_refresh_tokens:
                del self.refresh_tokens[old]
            else:
                del self.refresh_tokens[issued.pop("refresh_token")]
            return JSONResponse(issued)
        return JSONResponse({"error": "unsupported_grant_type"}, status_code=400)

    async def revoke(self, request: Request) -> Response:
        self.calls["revoke"] += 1
        form = {key: str(value) for key, value in (await request.form()).items()}
        if self._client(request, form) is None:
            return JSONResponse({"error": "invalid_client"}, status_code=401)
        token = form.get("token", "")
        self.revoked.append(token)
        self.access_tokens.discard(token)
        self.refresh_tokens.pop(token, None)
        return Response(status_code=200)
