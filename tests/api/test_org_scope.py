"""A token that names no organisation (no app_metadata.org_id) gets a clear 403 problem from every
org-scoped route, before any tenant transaction: the database here is unreachable, so a route that went
on to it would answer 500 (an empty org id) or 503 instead."""

from __future__ import annotations

import uuid

import httpx
import pytest

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256

# Not org-scoped: the platform's own route, and the OAuth callback (the browser, bound by its state).
NOT_ORG_SCOPED = {"/api/v1/orgs", "/api/v1/mcp/oauth/callback"}
PATH_VALUES = {"{name}": "s1", "{configuration_id}": str(uuid.uuid4()), "{prompt_id}": str(uuid.uuid4()),
               "{provider}": "anthropic"}
NO_ORG = {"Authorization": f"Bearer {hs256(sub='drifter', app_metadata={'role': 'admin'})}"}


def org_scoped_operations() -> list[tuple[str, str]]:
    paths = create_app(Settings()).openapi()["paths"]
    return [(method.upper(), path) for path, operations in paths.items()
            if path.startswith("/api/v1/") and path not in NOT_ORG_SCOPED for method in operations]


async def _call(method: str, path: str, headers: dict[str, str]) -> httpx.Response:
    database = Database("postgresql://nobody@127.0.0.1:1/none", connect_timeout=0.2)
    services = Services(settings=Settings(encryption_keys=[]), database=database, verifier=TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET))
    for placeholder, value in PATH_VALUES.items():
        path = path.replace(placeholder, value)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(services_override=services)),
                                 base_url="http://api.test") as api:
        return await api.request(method, path, headers=headers,
                                 json={} if method in ("POST", "PUT") else None)


@pytest.mark.parametrize(("method", "path"), org_scoped_operations())
async def test_no_org_in_the_token_is_a_403_problem(method, path):
    response = await _call(method, path, NO_ORG)
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "organisation" in response.json()["detail"] or "org admins" in response.json()["detail"]


# Routes where the platform operator has work of its own (global prompts; the platform's audit chain).
PLATFORM_ALSO = ("/api/v1/prompts", "/api/v1/audit")
SERVICE_ROLE_WITH_ORG = {"Authorization": f"Bearer {hs256(sub='operator', role='service_role')}"}


@pytest.mark.parametrize(("method", "path"), [
    (method, path) for method, path in org_scoped_operations()
    if not path.startswith(PLATFORM_ALSO) or path == "/api/v1/prompts/compose"])
async def test_a_service_role_token_naming_an_org_is_a_403_problem_on_tenant_routes(method, path):
    # It would otherwise run in the platform's context: tenant rows unseen, its audit in the wrong chain.
    response = await _call(method, path, SERVICE_ROLE_WITH_ORG)
    assert response.status_code == 403, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "service_role" in response.json()["detail"]


NOT_A_DNS_LABEL = ["Acme Corp", "../x", "a" * 64, "ACME", "acme-", "acme.corp", "-acme", "ac\u00e9me"]


def _bearer_for_org(org: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {hs256(sub='u', app_metadata={'org_id': org, 'role': 'admin'})}"}


@pytest.mark.parametrize("org", NOT_A_DNS_LABEL)
async def test_an_org_id_that_is_not_a_dns_label_is_a_401_problem(org):
    response = await _call("GET", "/api/v1/mcp/configurations", _bearer_for_org(org))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert "org_id" in response.json()["detail"] and "DNS label" in response.json()["detail"]
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(("method", "path"), org_scoped_operations())
async def test_every_org_scoped_route_refuses_a_malformed_org_id_before_using_it(method, path):
    response = await _call(method, path, _bearer_for_org("Acme Corp"))
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize("org", [42, ["acme"], {"id": "acme"}])
async def test_an_org_id_that_is_not_a_string_is_a_401_problem(org):
    response = await _call("GET", "/api/v1/mcp/configurations", _bearer_for_org(org))
    assert response.status_code == 401, response.text
