"""Headers an MCP configuration may carry: HTTP token names that are not reserved, values of visible
ASCII, space and tab. Every body that takes headers refuses the rest, naming the field; the MCPServer
model (and so the operator) refuses them too. A real apiserver's refusal is in test_mcp_cluster.py."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError

from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.routers.mcp import ConfigurationBody, ConnectionTest
from agentbox.api.settings import Settings
from agentbox.crds.mcpserver import MCPServerSpec

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256

SERVER = {"transport": "streamable-http", "url": "https://mcp.example.com/mcp"}
RESERVED = ["Host", "content-length", "Transfer-Encoding", "Connection", "Keep-Alive", "Upgrade", "TE",
            "Trailer", "Expect", "Proxy-Authorization", "proxy-connection", "PROXY-Anything", "Authorization"]
NOT_TOKENS = ["Bad Name", "X-Foo:", "X-Foo\r\nX-Evil", "Caf\u00e9", "X(1)", ""]
UNSAFE_VALUES = ["a\r\nX-Injected: 1", "a\nb", "a\rb", "a\x00b", "bell\x07", "del\x7f", "caf\u00e9",
                 "\u2028", "ok\x1b[31m"]
ALLOWED = [("Cookie", "session=abc; theme=dark"), ("X-Api-Key", "key with spaces\tand a tab"),
           ("Accept-Language", "en"), ("X-Empty", "")]


def configuration(**extra) -> dict:
    return {"name": "srv", **SERVER, **extra}


def first_error(model, body) -> tuple[tuple, str]:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    error = caught.value.errors()[0]
    return error["loc"], error["msg"]


@pytest.mark.parametrize("name", RESERVED)
@pytest.mark.parametrize("model", [ConfigurationBody, ConnectionTest])
def test_reserved_header_names_are_refused_plain_and_secret(model, name):
    body = configuration() if model is ConfigurationBody else dict(SERVER)
    loc, message = first_error(model, {**body, "headers": [{"name": name, "value": "x"}]})
    assert loc == ("headers", 0, "name") and "reserved" in message
    loc, message = first_error(model, {**body, "secretHeaders": {name: "x"}})
    assert loc[:2] == ("secretHeaders", name) and "reserved" in message


@pytest.mark.parametrize("name", NOT_TOKENS)
def test_names_that_are_not_http_tokens_are_refused(name):
    loc, message = first_error(ConfigurationBody, configuration(headers=[{"name": name, "value": "x"}]))
    assert loc == ("headers", 0, "name"), message


@pytest.mark.parametrize("value", UNSAFE_VALUES)
@pytest.mark.parametrize("model", [ConfigurationBody, ConnectionTest])
def test_control_and_non_ascii_characters_in_values_are_refused_plain_and_secret(model, value):
    body = configuration() if model is ConfigurationBody else dict(SERVER)
    loc, message = first_error(model, {**body, "headers": [{"name": "X-Foo", "value": value}]})
    assert loc == ("headers", 0, "value")
    assert "U+" in message or "NUL" in message
    loc, message = first_error(model, {**body, "secretHeaders": {"X-Foo": value}})
    assert loc == ("secretHeaders", "X-Foo")


@pytest.mark.parametrize(("name", "value"), ALLOWED)
def test_ordinary_headers_pass(name, value):
    body = ConfigurationBody.model_validate(configuration(headers=[{"name": name, "value": value}],
                                                          secretHeaders={"X-Secret": value}))
    assert body.headers[0].name == name and body.secret_headers == {"X-Secret": value}
    spec = MCPServerSpec.model_validate({**SERVER, "headers": [{"name": name, "value": value}]})
    assert spec.headers[0].value == value


@pytest.mark.parametrize(("header", "field"), [({"name": "Host", "value": "internal.example"}, "name"),
                                                ({"name": "proxy-authorization", "value": "x"}, "name"),
                                                ({"name": "X-Foo", "value": "a\r\nb"}, "value")])
def test_the_mcpserver_model_refuses_them_too(header, field):
    loc, _ = first_error(MCPServerSpec, {**SERVER, "headers": [header]})
    assert loc == ("headers", 0, field)


ADMIN = {"Authorization": f"Bearer {hs256(app_metadata={'org_id': 'acme', 'role': 'admin'})}"}


@pytest.mark.parametrize(("body", "field"), [
    ({"headers": [{"name": "X-Foo", "value": "a\r\nX-Injected: 1"}]}, "body.headers.0.value"),
    ({"headers": [{"name": "Host", "value": "metadata.internal"}]}, "body.headers.0.name"),
    ({"secretHeaders": {"X-Foo": "a\nb"}}, "body.secretHeaders.X-Foo"),
    ({"secretHeaders": {"Transfer-Encoding": "chunked"}}, "body.secretHeaders.Transfer-Encoding"),
])
async def test_the_api_answers_a_422_problem_naming_the_header(body, field):
    services = Services(settings=Settings(), verifier=TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(create_app(services_override=services)),
                                 base_url="http://api.test") as api:
        response = await api.post("/api/v1/mcp/test", headers=ADMIN, json={**SERVER, **body})
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["errors"][0]["field"].startswith(field), response.text
