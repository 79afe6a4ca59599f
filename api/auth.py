"""Bearer-token authentication: PyJWT verification, an async JWKS cache, and the caller's Principal.

Key sources and their algorithm allow-lists: the JWKS (RS256, ES256) and the shared secret (HS256 only).
The token's header picks the source; anything else (alg none, HS384, HS256 without a configured secret)
is refused before a key is looked at.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import httpx
import jwt
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from agentbox.api.db import ORG_ID_MAX_LENGTH, InvalidOrgId, check_org_id
from agentbox.api.problems import ProblemError

log = logging.getLogger("agentbox.api.auth")

JWKS_ALGORITHMS = frozenset({"RS256", "ES256"})
SHARED_SECRET_ALGORITHMS = frozenset({"HS256"})
REQUIRED_CLAIMS = ["exp", "iat", "sub", "aud", "iss"]
Role = Literal["admin", "user"]


@dataclass(frozen=True)
class Principal:
    sub: str
    org: str | None
    role: Role
    is_platform: bool

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class InvalidToken(Exception):
    """The token is not acceptable; the message is safe to show the caller."""


class KeysUnavailable(Exception):
    """No usable key set: the JWKS endpoint failed and nothing fresh enough is cached."""


class JwksCache:
    """The JWKS keys by `kid`, fetched with httpx's async client (no thread, never blocks the loop).

    - An unknown kid refetches at most once per `cooldown` (one fetch serves everyone waiting on it).
    - Keys older than `max_age` are refreshed in the background while they keep verifying.
    - Stale policy: when fetching fails, keys last fetched within `max_stale` keep verifying; after that
      they are dropped and verification answers 503 until a fetch succeeds.
    """

    def __init__(self, url: str, http: httpx.AsyncClient, *, cooldown: float, max_age: float,
                 max_stale: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self._http = http
        self._cooldown = cooldown
        self._max_age = max_age
        self._max_stale = max_stale
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._attempted_at: float | None = None
        self._lock = asyncio.Lock()
        self._background: asyncio.Task[None] | None = None
        self.fetches = 0

    async def key_for(self, kid: str) -> jwt.PyJWK:
        now = self._clock()
        self._drop_if_too_stale(now)
        if kid in self._keys:
            if self._age(now) > self._max_age and self._cooldown_over(now):
                self._refresh_in_background(now)
            return self._keys[kid]
        if self._cooldown_over(now):
            await self._refresh(requested_at=now)
            self._drop_if_too_stale(self._clock())
        if kid in self._keys:
            return self._keys[kid]
        if not self._keys:
            raise KeysUnavailable("the signing keys could not be fetched")
        raise InvalidToken("the token's signing key is unknown")

    def _age(self, now: float) -> float:
        return float("inf") if self._fetched_at is None else now - self._fetched_at

    def _cooldown_over(self, now: float) -> bool:
        return self._attempted_at is None or now - self._attempted_at >= self._cooldown

    def _drop_if_too_stale(self, now: float) -> None:
        if self._keys and self._age(now) > self._max_stale:
            log.warning("dropping JWKS keys older than the stale limit", extra={"jwks_url": self.url})
            self._keys = {}

    def _refresh_in_background(self, now: float) -> None:
        if self._background is None or self._background.done():
            self._background = asyncio.create_task(self._refresh(requested_at=now))

    async def _refresh(self, requested_at: float) -> None:
        async with self._lock:
            if self._attempted_at is not None and self._attempted_at >= requested_at:
                return  # someone else fetched while this caller waited for the lock
            self._attempted_at = self._clock()
            self.fetches += 1
            try:
                response = await self._http.get(self.url)
                response.raise_for_status()
                keys = parse_jwks(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("JWKS fetch failed; keeping cached keys", extra={"jwks_url": self.url,
                                                                            "error": type(exc).__name__})
                return
            self._keys = keys
            self._fetched_at = self._clock()


def parse_jwks(document: Any) -> dict[str, jwt.PyJWK]:
    """Usable signing keys by kid: RS256/ES256 only, `use` absent or `sig`, a kid required."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("a JWKS document is an object with a `keys` list")
    keys: dict[str, jwt.PyJWK] = {}
    for entry in document["keys"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("kid"), str):
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            key = jwt.PyJWK(entry)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in JWKS_ALGORITHMS:
            keys[entry["kid"]] = key
    if not keys:
        raise ValueError("the JWKS document holds no usable RS256/ES256 signing key")
    return keys


class TokenVerifier:
    def __init__(self, *, issuer: str, audience: str, leeway: float, hs256_secret: str | None = None,
                 jwks: JwksCache | None = None) -> None:
        if not hs256_secret and jwks is None:
            raise ValueError("a token verifier needs a JWKS or an HS256 secret")
        self.issuer = issuer
        self.audience = audience
        self.leeway = leeway
        self._secret = hs256_secret
        self._jwks = jwks

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise InvalidToken("the token is malformed") from exc
        algorithm = header.get("alg")
        key: Any
        if algorithm in SHARED_SECRET_ALGORITHMS and self._secret:
            key = self._secret
        elif algorithm in JWKS_ALGORITHMS and self._jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise InvalidToken("the token has no key id (kid)")
            jwk = await self._jwks.key_for(kid)
            if jwk.algorithm_name != algorithm:
                raise InvalidToken("the token's algorithm does not match its key")
            key = jwk
        else:
            raise InvalidToken(f"algorithm {algorithm!r} is not accepted")
        try:
            claims = jwt.decode(token, key, algorithms=[algorithm], audience=self.audience,
                                issuer=self.issuer, leeway=self.leeway, options={"require": REQUIRED_CLAIMS})
        except jwt.ExpiredSignatureError as exc:
            raise InvalidToken("the token has expired") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token lacks the {exc.claim!r} claim") from exc
        except jwt.InvalidAudienceError as exc:
            raise InvalidToken("the token's audience is not accepted") from exc
        except jwt.InvalidIssuerError as exc:
            raise InvalidToken("the token's issuer is not accepted") from exc
        except jwt.PyJWTError as exc:
            raise InvalidToken("the token is invalid") from exc
        return principal_from_claims(claims)


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    """Org and role come from `app_metadata` only (only the service role can write it); `user_metadata`
    is the user's own to edit and is never read."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidToken("the token's subject is empty")
    top_level_role = claims.get("role")
    if top_level_role == "anon":
        raise InvalidToken("anonymous tokens are not accepted")
    metadata = claims.get("app_metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    org = metadata.get("org_id")
    if org is not None and org != "":
        # The org names a tenant namespace and a row-security context: a token whose org cannot be one
        # is refused here, before any route uses it.
        try:
            check_org_id(org)
        except InvalidOrgId:
            raise InvalidToken("the token's app_metadata.org_id must be a DNS label (lowercase letters, "
                               f"digits and '-') of at most {ORG_ID_MAX_LENGTH} characters") from None
    role = metadata.get("role")
    return Principal(sub=sub, org=org or None,
                     role="admin" if role == "admin" else "user",
                     is_platform=top_level_role == "service_role")


_bearer = HTTPBearer(auto_error=False, description="A JWT from the configured issuer")
_CHALLENGE = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


async def authenticate(request: Request,
                       credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> Principal:
    verifier: TokenVerifier | None = request.app.state.services.verifier
    if verifier is None:
        raise ProblemError(503, "Service Unavailable", "authentication is not configured")
    if credentials is None:
        raise ProblemError(401, "Unauthorized", "an `Authorization: Bearer <token>` header is required",
                           headers={"WWW-Authenticate": "Bearer"})
    try:
        principal = await verifier.verify(credentials.credentials)
    except InvalidToken as exc:
        raise ProblemError(401, "Unauthorized", str(exc), headers=_CHALLENGE) from exc
    except KeysUnavailable as exc:
        raise ProblemError(503, "Service Unavailable", str(exc), headers={"Retry-After": "5"}) from exc
    request.state.principal = principal
    return principal


async def tenant_member(principal: Principal = Depends(authenticate)) -> Principal:
    """A caller acting inside one organisation (its org from the token). Never the platform operator,
    whatever org its token names: its acts belong to the platform's own context and audit chain, where
    tenant rows are neither found nor writable."""
    if principal.is_platform:
        raise ProblemError(403, "Forbidden", "a service_role token acts for the platform, not inside an "
                           "organisation: use a token of an org member")
    if principal.org is None:
        raise ProblemError(403, "Forbidden", "the token names no organisation (app_metadata.org_id)")
    return principal


async def org_admin(principal: Principal = Depends(tenant_member)) -> Principal:
    if not principal.is_admin:
        raise ProblemError(403, "Forbidden", "this needs the admin role in the organisation")
    return principal


async def platform_operator(principal: Principal = Depends(authenticate)) -> Principal:
    if not principal.is_platform:
        raise ProblemError(403, "Forbidden", "this needs a service_role token")
    return principal
