"""The API's checked client: an httpx client that may reach any host (the OAuth calls for MCP servers),
each request's host checked and the request sent to the checked address. The address policy and the
pinned connection (the MCP connection test's) live in agentbox.crds.addresses, shared with the operator.
"""

from __future__ import annotations

import httpx

from agentbox.crds.addresses import (
    Address,
    Pin,
    PinnedTransport,
    RefusedAddress,
    Unresolvable,
    aimed,
    pinned_client_factory,
    refusal,
    resolve_allowed,
)

# The API's routes know these by this module.
__all__ = ["Address", "CheckedTransport", "Pin", "PinnedTransport", "RefusedAddress", "Unresolvable",
           "checked_client", "pinned_client_factory", "refusal", "resolve_allowed"]


class CheckedTransport(httpx.AsyncBaseTransport):
    """For an httpx client that may reach any host: each request's host is resolved and checked
    (resolve_allowed), then the request goes to that address. Raises RefusedAddress or Unresolvable."""

    def __init__(self, *, allow_private: bool, inner: httpx.AsyncBaseTransport | None = None) -> None:
        self.allow_private = allow_private
        # No idle connections kept: the pool knows a connection by its address only, so a connection
        # opened (and its certificate checked) for one host name could otherwise carry another name's
        # request to the same address.
        self.inner = inner or httpx.AsyncHTTPTransport(
            trust_env=False, limits=httpx.Limits(max_keepalive_connections=0))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        address = await resolve_allowed(host, allow_private=self.allow_private)
        return await self.inner.handle_async_request(aimed(request, host, address))

    async def aclose(self) -> None:
        await self.inner.aclose()


def checked_client(*, allow_private: bool, timeout: float) -> httpx.AsyncClient:
    """An httpx client whose every request passes the address check (CheckedTransport). It follows no
    redirect by itself; a request that asks to follow them has each hop checked."""
    return httpx.AsyncClient(transport=CheckedTransport(allow_private=allow_private), timeout=timeout,
                             follow_redirects=False, trust_env=False)
