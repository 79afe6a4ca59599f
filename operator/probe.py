"""Probing an http/sse MCP server: connect with a FastMCP client, list its tools, all under a deadline.

The URL is a tenant's: the probe connects only where the address policy allows (agentbox.crds.addresses,
the API's rule too) and to the address it checked, so an MCPServer cannot point the operator at cloud
metadata, the apiserver or anything else on the cluster's network (private addresses only when
AGENTBOX_MCP_PROBE_ALLOW_PRIVATE_NETWORKS is true: MCP servers inside the cluster)."""

import asyncio
from typing import Any
from urllib.parse import urlsplit

# At load, not in the first probe: the import takes a second of CPU, which would stall the event loop.
from fastmcp import Client
from fastmcp.client.transports import SSETransport, StreamableHttpTransport

from agentbox.crds.addresses import Pin, pinned_client_factory, resolve_allowed
from agentbox.crds.fields import parse_duration
from agentbox.crds.mcpserver import MCPServerSpec


async def list_tools(spec: MCPServerSpec, token: str | None, headers: dict[str, str], *,
                     allow_private: bool) -> list[dict[str, str]]:
    """The server's tools. Raises RefusedAddress (and Unresolvable) before connecting anywhere."""
    timeout = parse_duration(spec.timeout).total_seconds()
    host = urlsplit(spec.url).hostname or ""
    transport_class: Any = SSETransport if spec.transport == "sse" else StreamableHttpTransport
    async with asyncio.timeout(timeout):
        pin = Pin(host, await resolve_allowed(host, allow_private=allow_private, who="the operator"))
        transport = transport_class(spec.url, headers=headers or None, auth=token,
                                    httpx_client_factory=pinned_client_factory(pin))
        async with Client(transport, timeout=timeout) as client:
            tools = await client.list_tools()
    return [{"name": tool.name, "description": (tool.description or "")[:4096]} for tool in tools]
