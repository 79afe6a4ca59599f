"""Where agentbox's own components connect on a tenant's say-so (the API's MCP connection test and OAuth
calls, the operator's probe of an MCPServer), and connections that go to the address that was checked.
One home for the API and the operator, which may not import each other.

A URL's host is resolved once; every address it resolves to must be allowed, and the connection then goes
to the first of those addresses with the original host name kept for the Host header and TLS (SNI and
certificate check). A DNS answer that changes between the check and the connect (rebinding) cannot move
the connection. A pinned connection (Pin) reaches its one host and refuses any other (a redirect
elsewhere).

Never allowed: link-local addresses (169.254.0.0/16 and fe80::/10, where cloud metadata services live, and
the IPv6 metadata range fd00:ec2::/32), unspecified, multicast and reserved addresses. Private networks
(RFC 1918, unique-local fc00::/7, carrier-grade NAT 100.64.0.0/10) and loopback are allowed only when the
deployment says so (the API's AGENTBOX_MCP_TEST_ALLOW_PRIVATE_NETWORKS, the operator's
AGENTBOX_MCP_PROBE_ALLOW_PRIVATE_NETWORKS: development, tests, MCP servers inside the cluster).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

import httpx2

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

_METADATA = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"),
             ipaddress.ip_network("fd00:ec2::/32"))
_SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: not public


class RefusedAddress(ValueError):
    """The host resolves to an address that is not contacted; the message says which kind."""


class Unresolvable(OSError):
    """The host name does not resolve."""


def refusal(address: Address, *, allow_private: bool) -> str | None:
    """Why `address` may not be contacted (a short noun phrase), or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in _METADATA) or address.is_link_local:
        return "a link-local (cloud metadata) address"
    if address.is_loopback:  # before `reserved`: ::1 lies in the reserved ::/8
        return None if allow_private else "a loopback address"
    if address.is_unspecified or address.is_multicast or address.is_reserved:
        return "an unspecified, multicast or reserved address"
    if not allow_private and (address.is_private or address in _SHARED_ADDRESS_SPACE):
        return "a private-network address"
    return None


async def resolve_allowed(host: str, *, allow_private: bool, who: str = "the API") -> Address:
    """The address to connect to for `host`: all of its addresses are checked, the first is used. `who`
    connects: named in the refusal."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise Unresolvable(f"cannot resolve {host!r}") from exc
    addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
    if not addresses:
        raise Unresolvable(f"cannot resolve {host!r}")
    for address in addresses:
        why = refusal(address, allow_private=allow_private)
        if why is not None:
            raise RefusedAddress(f"{host!r} resolves to {why} ({address}), which {who} does not contact")
    return addresses[0]


@dataclass(frozen=True)
class Pin:
    host: str
    address: Address


def aimed(request: Any, host: str, address: Address) -> Any:
    """A copy of `request` (httpx or httpx2) that goes to `address`, its Host header and TLS name (SNI,
    certificate check) still `host`. httpx has no resolver hook, so the URL's host is swapped for the
    checked address; the caller's request keeps its URL (a redirect's Location resolves against it)."""
    extensions = dict(request.extensions)
    if request.url.scheme == "https":
        extensions["sni_hostname"] = host
    return type(request)(request.method, request.url.copy_with(host=str(address)), headers=request.headers,
                         stream=request.stream, extensions=extensions)


class PinnedTransport(httpx2.AsyncBaseTransport):
    """Sends requests for `pin.host` to `pin.address`; refuses any other host."""

    def __init__(self, pin: Pin, inner: httpx2.AsyncBaseTransport | None = None) -> None:
        self.pin = pin
        self.inner = inner or httpx2.AsyncHTTPTransport(trust_env=False)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if request.url.host != self.pin.host:
            raise httpx2.ConnectError(f"refusing to contact {request.url.host!r}: only {self.pin.host!r} "
                                      "was checked", request=request)
        return await self.inner.handle_async_request(aimed(request, self.pin.host, self.pin.address))

    async def aclose(self) -> None:
        await self.inner.aclose()


def pinned_client_factory(pin: Pin) -> Any:
    """An httpx client factory for FastMCP's HTTP transports whose clients only ever reach `pin`."""

    def factory(headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None,
                auth: httpx2.Auth | None = None, **_: Any) -> httpx2.AsyncClient:
        # Redirects stay off: the MCP transports follow same-origin ones themselves.
        return httpx2.AsyncClient(transport=PinnedTransport(pin), headers=headers, auth=auth,
                                  timeout=timeout or httpx2.Timeout(30.0, read=300.0), trust_env=False,
                                  follow_redirects=False)

    return factory
