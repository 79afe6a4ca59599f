"""Where the MCP connection test and the OAuth calls may connect: address classes (pure), resolution, the
pinned connection and the checked client against a real loopback server, and the connection test's
refusals with the default settings (the OAuth routes' refusals are in tests/oauth/test_oauth_flow.py)."""

from __future__ import annotations

import ipaddress

import httpx
import httpx2
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Route

from agentbox.api import egress
from agentbox.api.app import Services, create_app
from agentbox.api.auth import TokenVerifier
from agentbox.api.settings import Settings

from .conftest import AUDIENCE, HS256_SECRET, ISSUER, hs256, serve

ALWAYS_REFUSED = ["169.254.169.254", "fe80::1", "fd00:ec2::254", "0.0.0.0",  # noqa: S104 (classified only)
                  "224.0.0.1", "240.0.0.1", "::ffff:169.254.169.254"]
PRIVATE = ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "fc00::1", "100.64.0.1",
           "::ffff:127.0.0.1"]
PUBLIC = ["1.1.1.1", "93.184.215.14", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", ALWAYS_REFUSED)
def test_link_local_metadata_and_special_addresses_are_refused_even_when_private_is_allowed(address):
    assert egress.refusal(ipaddress.ip_address(address), allow_private=True) is not None


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_loopback_addresses_need_the_setting(address):
    assert egress.refusal(ipaddress.ip_address(address), allow_private=False) is not None
    assert egress.refusal(ipaddress.ip_address(address), allow_private=True) is None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_allowed(address):
    assert egress.refusal(ipaddress.ip_address(address), allow_private=False) is None


async def test_a_name_is_checked_by_every_address_it_resolves_to():
    with pytest.raises(egress.RefusedAddress, match="loopback"):
        await egress.resolve_allowed("localhost", allow_private=False)
    assert (await egress.resolve_allowed("localhost", allow_private=True)).is_loopback
    with pytest.raises(egress.RefusedAddress, match="link-local"):
        await egress.resolve_allowed("169.254.169.254", allow_private=True)
    with pytest.raises(egress.Unresolvable):
        await egress.resolve_allowed("no-such-host.invalid", allow_private=True)


async def test_the_pinned_connection_goes_to_the_checked_address_and_nowhere_else():
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"host": request.headers["host"]})

    async with serve(Starlette(routes=[Route("/", echo)])) as base:
        port = httpx.URL(base).port
        # `rebind.test` resolves nowhere: the request can only arrive through the pinned address.
        pin = egress.Pin("rebind.test", ipaddress.ip_address("127.0.0.1"))
        async with egress.pinned_client_factory(pin)(headers={"X-Probe": "1"}) as client:
            answer = await client.get(f"http://rebind.test:{port}/")
            assert answer.json() == {"host": f"rebind.test:{port}"}
            with pytest.raises(httpx2.ConnectError, match=r"only 'rebind\.test'"):
                await client.get(f"http://127.0.0.1:{port}/")


def _app(**settings) -> httpx.AsyncClient:
    services = Services(settings=Settings(**settings), verifier=TokenVerifier(
        issuer=ISSUER, audience=AUDIENCE, leeway=30, hs256_secret=HS256_SECRET))
    return httpx.AsyncClient(transport=httpx.ASGITransport(create_app(services_override=services)),
                             base_url="http://api.test")


ADMIN = {"Authorization": f"Bearer {hs256(app_metadata={'org_id': 'acme', 'role': 'admin'})}"}


@pytest.mark.parametrize(("url", "kind"), [("http://127.0.0.1:9/mcp", "loopback"),
                                           ("http://localhost:9/mcp", "loopback"),
                                           ("http://10.0.0.7/mcp", "private-network"),
                                           ("http://[fd12::1]/mcp", "private-network"),
                                           ("http://169.254.169.254/sse", "link-local")])
async def test_the_connection_test_refuses_private_addresses_by_default(url, kind):
    async with _app() as api:
        refused = await api.post("/api/v1/mcp/test", headers=ADMIN,
                                 json={"transport": "streamable-http", "url": url})
    assert refused.status_code == 422, refused.text
    assert kind in refused.json()["detail"] and refused.json()["errors"][0]["field"] == "body.url"


class Recording(httpx.AsyncBaseTransport):
    """A real transport that notes the host each request was sent to."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(trust_env=False)
        self.hosts: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.hosts.append(request.url.host)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


def echo_server():
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"host": request.headers["host"], "client_port": request.client.port})

    async def metadata_hop(request: Request) -> RedirectResponse:
        return RedirectResponse("http://169.254.169.254/latest/meta-data/", status_code=302)

    async def same_server_hop(request: Request) -> RedirectResponse:
        return RedirectResponse("/", status_code=302)

    return serve(Starlette(routes=[Route("/", echo), Route("/to-metadata", metadata_hop),
                                   Route("/to-echo", same_server_hop)]))


async def test_the_checked_client_connects_to_the_address_it_checked_under_the_name_asked_for():
    async with echo_server() as base:
        port = httpx.URL(base).port
        recording = Recording()
        async with httpx.AsyncClient(transport=egress.CheckedTransport(allow_private=True, inner=recording),
                                     trust_env=False) as client:
            answer = await client.get(f"http://localhost:{port}/")
    # The connection went to the checked address (no second resolution); Host and the caller's URL kept.
    assert recording.hosts == ["127.0.0.1"]
    assert answer.json()["host"] == f"localhost:{port}" and answer.request.url.host == "localhost"


@pytest.mark.parametrize(("url", "kind"), [("http://127.0.0.1:{port}/", "loopback"),
                                           ("http://localhost:{port}/", "loopback"),
                                           ("https://10.0.0.7/token", "private-network"),
                                           ("https://[fd12::1]/token", "private-network"),
                                           ("https://100.64.0.1/register", "private-network")])
async def test_the_checked_client_refuses_loopback_and_private_addresses_by_default(url, kind):
    async with echo_server() as base:
        recording = Recording()
        async with httpx.AsyncClient(transport=egress.CheckedTransport(allow_private=False, inner=recording),
                                     trust_env=False) as client:
            with pytest.raises(egress.RefusedAddress, match=kind):
                await client.get(url.format(port=httpx.URL(base).port))
    assert recording.hosts == []


async def test_the_checked_client_refuses_link_local_even_when_private_networks_are_allowed():
    async with egress.checked_client(allow_private=True, timeout=5) as client:
        for url in ("http://169.254.169.254/latest/meta-data/", "https://[fe80::1]/", "https://[fd00:ec2::254]/"):
            with pytest.raises(egress.RefusedAddress, match="link-local"):
                await client.get(url)
        with pytest.raises(egress.Unresolvable):
            await client.get("https://no-such-host.invalid/")


async def test_every_redirect_hop_is_checked_and_none_is_followed_unasked():
    async with echo_server() as base, egress.checked_client(allow_private=True, timeout=5) as client:
        assert (await client.get(f"{base}/to-metadata")).status_code == 302  # not followed by default
        with pytest.raises(egress.RefusedAddress, match="link-local"):
            await client.get(f"{base}/to-metadata", follow_redirects=True)
        port = httpx.URL(base).port
        followed = await client.get(f"http://localhost:{port}/to-echo", follow_redirects=True)
        assert followed.json()["host"] == f"localhost:{port}" and followed.url.host == "localhost"


async def test_the_checked_client_keeps_no_connection_for_a_later_request():
    # A kept connection is known by its address only: it could carry another name's request there.
    async with echo_server() as base, egress.checked_client(allow_private=True, timeout=5) as client:
        port = httpx.URL(base).port
        first = (await client.get(f"http://localhost:{port}/")).json()
        second = (await client.get(f"http://127.0.0.1:{port}/")).json()
    assert first["client_port"] != second["client_port"]
