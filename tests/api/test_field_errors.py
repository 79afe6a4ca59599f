"""A refused request names the field at fault in its problem's `errors`, also when the rule spans fields
(checked by a model validator) or is checked by the route. No database or cluster is reached: the
checks come first."""

from __future__ import annotations

import httpx
import pytest

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.db import Database
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256

ADMIN = {"Authorization": f"Bearer {hs256(sub='admin', app_metadata={'org_id': 'acme', 'role': 'admin'})}"}
SERVER = {"name": "github", "transport": "streamable-http", "url": "https://mcp.example.com/mcp"}


async def _call(method: str, path: str, **kwargs) -> httpx.Response:
    database = Database("postgresql://nobody@127.0.0.1:1/none", connect_timeout=0.2)
    services = Services(settings=Settings(encryption_keys=[]), database=database, kube=object(),
                        verifier=TokenVerifier(issuer=ISSUER, audience=AUDIENCE, leeway=30,
                                               hs256_secret=HS256_SECRET))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(services_override=services)),
                                 base_url="http://api.test") as api:
        return await api.request(method, path, headers=ADMIN, **kwargs)


def _fields(response: httpx.Response) -> list[str]:
    assert response.headers["content-type"] == "application/problem+json"
    return [error["field"] for error in response.json()["errors"]]


@pytest.mark.parametrize(("body", "field"), [
    ({**SERVER, "url": None}, "body.url"),
    ({**SERVER, "timeout": "1500ms"}, "body.timeout"),
    ({**SERVER, "transport": "stdio", "stdio": {"command": "npx"}}, "body.url"),
    ({**SERVER, "stdioEnv": {"KEY": "x"}}, "body.stdioEnv"),
    ({**SERVER, "headers": [{"name": "X-A", "value": "1"}, {"name": "X-A", "value": "2"}]}, "body.headers"),
])
async def test_an_mcp_configuration_that_cannot_be_a_server_names_its_field(body, field):
    response = await _call("POST", "/api/v1/mcp/configurations", json=body)
    assert response.status_code == 422, response.text
    assert _fields(response) == [field]


@pytest.mark.parametrize(("agent", "field"), [
    ({"image": "registry.example/evil:latest"}, "body.agent.image"),
    ({"env": [{"name": "A", "value": "x"},
              {"name": "B", "valueFrom": {"secretKeyRef": {"name": "other-user", "key": "k"}}}]},
     "body.agent.env.1.valueFrom"),
])
async def test_a_session_the_api_may_not_create_names_its_field(agent, field):
    response = await _call("POST", "/api/v1/sessions", json={"agent": agent})
    assert response.status_code == 422, response.text
    assert _fields(response) == [field]


async def test_an_unknown_audit_cursor_names_the_query_parameter():
    response = await _call("GET", "/api/v1/audit", params={"cursor": "%%%"})
    assert response.status_code == 400, response.text
    assert _fields(response) == ["query.cursor"]
