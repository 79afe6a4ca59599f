"""Kubernetes giving no answer at all (connection refused) is a 503 problem with Retry-After, not a 500."""

from __future__ import annotations

import socket

import httpx
from kubernetes_asyncio import client

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.kube import Kube
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_an_unreachable_apiserver_is_a_503_problem():
    configuration = client.Configuration(host=f"http://127.0.0.1:{closed_port()}")
    api_client = client.ApiClient(configuration=configuration)
    services = Services(settings=Settings(), database=None, kube=Kube(api_client, timeout=2), runner=None,
                        verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                               hs256_secret=HS256_SECRET))
    token = hs256(sub="u1", app_metadata={"org_id": "acme", "role": "user"})
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(services_override=services)),
                                     base_url="http://api.test") as api:
            response = await api.get("/api/v1/sessions", headers={"Authorization": f"Bearer {token}"})
    finally:
        await api_client.close()
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["retry-after"] == "2"
    assert response.json()["detail"] == "Kubernetes is unavailable; retry shortly"
