"""Every JWT line of security.md, against keys made here and a JWKS served on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from fastapi import Depends
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentbox.api.app import Services, create_app
from agentbox.api.auth import InvalidToken, JwksCache, KeysUnavailable, Principal, TokenVerifier, authenticate
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, SigningKeys, claims, hs256, rs256, serve


class JwksEndpoint:
    """A JWKS document server whose keys, failures and delay the test controls."""

    def __init__(self, keys: SigningKeys) -> None:
        self.keys = keys
        self.hits = 0
        self.failing = False
        self.delay = 0.0
        self.app = Starlette(routes=[Route("/.well-known/jwks.json", self.handle)])

    async def handle(self, request: Request) -> JSONResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failing:
            return JSONResponse({"error": "down"}, status_code=500)
        return JSONResponse(self.keys.jwks())


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def keys() -> SigningKeys:
    return SigningKeys()


@pytest.fixture
async def endpoint(keys: SigningKeys):
    keys.published = {"rsa-1": keys.rsa, "ec-1": keys.ec}
    jwks = JwksEndpoint(keys)
    async with serve(jwks.app) as url:
        jwks.url = f"{url}/.well-known/jwks.json"
        yield jwks


@pytest.fixture
async def http():
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


def make_verifier(http: httpx.AsyncClient, endpoint: JwksEndpoint | None, *,
                  secret: str | None = HS256_SECRET, clock=time.monotonic, cooldown: float = 60,
                  max_age: float = 600, max_stale: float = 3600) -> TokenVerifier:
    cache = None if endpoint is None else JwksCache(endpoint.url, http, cooldown=cooldown, max_age=max_age,
                                                    max_stale=max_stale, clock=clock)
    return TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=secret, jwks=cache)


async def test_rs256_es256_and_hs256_tokens_verify(keys, endpoint, http):
    verifier = make_verifier(http, endpoint)
    for token in (rs256(keys), jwt.encode(claims(), keys.ec, algorithm="ES256", headers={"kid": "ec-1"}),
                  hs256()):
        expected = Principal(sub="user-1", org="acme", role="user", is_platform=False)
        assert await verifier.verify(token) == expected


async def test_alg_none_is_rejected(endpoint, http):
    token = jwt.encode(claims(), None, algorithm="none")
    with pytest.raises(InvalidToken, match="not accepted"):
        await make_verifier(http, endpoint).verify(token)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_hs256_signed_with_the_rsa_public_key_is_rejected(keys, endpoint, http):
    # The classic confusion attack: HMAC keyed with the public key the verifier publishes.
    public_pem = keys.rsa.public_key().public_bytes(serialization.Encoding.PEM,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    signing_input = f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT', 'kid': 'rsa-1'}).encode())}." \
                    f"{_b64(json.dumps(claims()).encode())}"
    signature = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    forged = f"{signing_input}.{_b64(signature)}"
    with pytest.raises(InvalidToken):
        await make_verifier(http, endpoint).verify(forged)
    with pytest.raises(InvalidToken, match="not accepted"):  # JWKS only: HS256 is not on its allow-list
        await make_verifier(http, endpoint, secret=None).verify(forged)


async def test_an_algorithm_that_does_not_match_the_key_is_rejected(keys, endpoint, http):
    token = jwt.encode(claims(), keys.ec, algorithm="ES256", headers={"kid": "rsa-1"})
    with pytest.raises(InvalidToken, match="does not match"):
        await make_verifier(http, endpoint).verify(token)


async def test_hs384_and_a_token_without_kid_are_rejected(keys, endpoint, http):
    with pytest.raises(InvalidToken, match="not accepted"):
        await make_verifier(http, endpoint).verify(jwt.encode(claims(), HS256_SECRET * 2, algorithm="HS384"))
    with pytest.raises(InvalidToken, match="kid"):
        await make_verifier(http, endpoint).verify(jwt.encode(claims(), keys.rsa, algorithm="RS256"))


@pytest.mark.parametrize("claim", ["exp", "iat", "sub", "aud", "iss"])
async def test_every_required_claim_is_required(keys, endpoint, http, claim):
    with pytest.raises(InvalidToken, match=claim if claim != "sub" else "sub"):
        await make_verifier(http, endpoint).verify(rs256(keys, **{claim: None}))


async def test_aud_anon_and_role_anon_are_rejected(endpoint, http):
    verifier = make_verifier(http, endpoint)
    with pytest.raises(InvalidToken, match="audience"):
        await verifier.verify(hs256(aud="anon"))
    with pytest.raises(InvalidToken, match="anonymous"):
        await verifier.verify(hs256(role="anon"))


@pytest.mark.parametrize("issuer", [ISSUER[:-3], ISSUER + "x", "https://auth.example.test", ISSUER.upper()])
async def test_the_issuer_must_match_exactly(endpoint, http, issuer):
    with pytest.raises(InvalidToken, match="issuer"):
        await make_verifier(http, endpoint).verify(hs256(iss=issuer))


async def test_leeway_is_small(endpoint, http):
    verifier = make_verifier(http, endpoint)
    now = int(time.time())
    assert await verifier.verify(hs256(exp=now - 10))
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.verify(hs256(exp=now - 40))
    with pytest.raises(InvalidToken):
        await verifier.verify(hs256(iat=now + 120))


async def test_org_and_role_come_from_app_metadata_only(endpoint, http):
    verifier = make_verifier(http, endpoint)
    forged = await verifier.verify(hs256(app_metadata={"org_id": "acme"},
                                         user_metadata={"role": "admin", "org_id": "other"}))
    assert (forged.org, forged.role, forged.is_admin) == ("acme", "user", False)
    admin = await verifier.verify(hs256(app_metadata={"org_id": "acme", "role": "admin"}))
    assert admin.is_admin and not admin.is_platform
    platform = await verifier.verify(hs256(role="service_role", app_metadata=None))
    assert platform.is_platform and platform.org is None
    metadata_claim = await verifier.verify(hs256(user_metadata={"role": "service_role"}))
    assert not metadata_claim.is_platform


async def test_a_wrong_signature_is_rejected(endpoint, http):
    with pytest.raises(InvalidToken):
        await make_verifier(http, endpoint).verify(hs256(secret="another-secret-of-at-least-32-bytes!!"))


async def test_unknown_kids_refetch_at_most_once_per_cooldown(keys, endpoint, http):
    clock = FakeClock()
    verifier = make_verifier(http, endpoint, clock=clock, cooldown=60)
    await verifier.verify(rs256(keys))
    assert endpoint.hits == 1
    clock.now += 61
    probes = [verifier.verify(jwt.encode(claims(), keys.rsa, algorithm="RS256",
                                         headers={"kid": uuid.uuid4().hex})) for _ in range(100)]
    results = await asyncio.gather(*probes, return_exceptions=True)
    assert all(isinstance(result, InvalidToken) for result in results)
    assert endpoint.hits == 2  # one refetch for the whole window
    with pytest.raises(InvalidToken):
        await verifier.verify(rs256(keys, kid="still-unknown"))
    assert endpoint.hits == 2
    clock.now += 61
    with pytest.raises(InvalidToken):
        await verifier.verify(rs256(keys, kid="still-unknown"))
    assert endpoint.hits == 3


async def test_a_newly_published_key_verifies_after_one_refresh(keys, endpoint, http):
    clock = FakeClock()
    verifier = make_verifier(http, endpoint, clock=clock, cooldown=60)
    await verifier.verify(rs256(keys))
    keys.published["rsa-2"] = keys.rsa  # same material under a new kid: a rotation
    clock.now += 61
    assert await verifier.verify(rs256(keys, kid="rsa-2"))
    assert endpoint.hits == 2


async def test_a_failing_jwks_keeps_cached_keys_until_the_stale_limit(keys, endpoint, http):
    clock = FakeClock()
    verifier = make_verifier(http, endpoint, clock=clock, cooldown=10, max_age=60, max_stale=300)
    await verifier.verify(rs256(keys))
    endpoint.failing = True
    clock.now += 100  # past max_age: a background refresh fails, the cached key still verifies
    assert await verifier.verify(rs256(keys))
    await asyncio.sleep(0.2)
    assert endpoint.hits == 2
    clock.now += 250  # past max_stale: the keys are dropped, and the refetch fails
    with pytest.raises(KeysUnavailable):
        await verifier.verify(rs256(keys))
    endpoint.failing = False
    clock.now += 11
    assert await verifier.verify(rs256(keys))  # recovery without restart


async def test_fetching_the_jwks_does_not_block_the_event_loop(keys, endpoint, http):
    endpoint.delay = 0.5
    verifier = make_verifier(http, endpoint)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        assert await verifier.verify(rs256(keys))
    finally:
        task.cancel()
    assert ticks >= 20  # the loop kept running through the half-second fetch


async def test_the_jwks_fetch_respects_its_timeout(keys, endpoint):
    endpoint.delay = 2
    async with httpx.AsyncClient(timeout=0.2) as short:
        started = time.monotonic()
        with pytest.raises(KeysUnavailable):
            await make_verifier(short, endpoint, secret=None).verify(rs256(keys))
    assert time.monotonic() - started < 1.5


def _app_with(verifier: TokenVerifier | None) -> TestClient:
    app = create_app(services_override=Services(settings=Settings(), verifier=verifier))

    @app.get("/whoami")
    async def whoami(principal: Principal = Depends(authenticate)) -> dict:
        return {"sub": principal.sub}

    return TestClient(app)


@pytest.mark.parametrize(("headers", "detail"), [
    ({}, "Authorization"),
    ({"Authorization": "Bearer not.a.jwt"}, "malformed"),
    ({"Authorization": "Basic dXNlcjpwYXNz"}, "Authorization"),
])
def test_http_answers_401_problems(headers, detail):
    client = _app_with(TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET))
    response = client.get("/whoami", headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert detail in response.json()["detail"]
    assert client.get("/whoami", headers={"Authorization": f"Bearer {hs256()}"}).json() == {"sub": "user-1"}


def test_http_answers_503_when_no_verifier_is_configured():
    response = _app_with(None).get("/whoami", headers={"Authorization": f"Bearer {hs256()}"})
    assert response.status_code == 503
