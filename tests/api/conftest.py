"""Helpers for the API tests: real HTTP servers on 127.0.0.1 and tokens signed with keys made here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import ec, rsa

ISSUER = "https://auth.example.test/auth/v1"
AUDIENCE = "authenticated"
HS256_SECRET = "a-test-secret-that-is-at-least-32-bytes-long"


@contextlib.asynccontextmanager
async def serve(app: Any, lifespan: str = "off") -> AsyncIterator[str]:
    """Run an ASGI app under uvicorn on 127.0.0.1 (a free port) for the block; yields its base URL."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan=lifespan)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


class SigningKeys:
    """An RSA and an EC key pair, published as a JWKS document under their kids."""

    def __init__(self) -> None:
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.ec = ec.generate_private_key(ec.SECP256R1())
        self.published: dict[str, Any] = {"rsa-1": self.rsa, "ec-1": self.ec}

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, private in self.published.items():
            algorithm = jwt.algorithms.RSAAlgorithm if isinstance(private, rsa.RSAPrivateKey) \
                else jwt.algorithms.ECAlgorithm
            jwk = algorithm.to_jwk(private.public_key(), as_dict=True)
            jwk.update(kid=kid, use="sig")
            keys.append(jwk)
        return {"keys": keys}


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "iat": now, "exp": now + 300,
                            "role": "authenticated", "app_metadata": {"org_id": "acme", "role": "user"}}
    base.update(overrides)
    return {key: value for key, value in base.items() if value is not None}


def rs256(keys: SigningKeys, kid: str = "rsa-1", **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), keys.published.get(kid, keys.rsa), algorithm="RS256",
                      headers={"kid": kid})


def hs256(secret: str = HS256_SECRET, **overrides: Any) -> str:
    return jwt.encode(claims(**overrides), secret, algorithm="HS256")
