"""Probing an http/sse MCP server: connect with a FastMCP client, list its tools, all under a deadline."""

import asyncio
from typing import Any

# At load, not in the first probe: the import takes a second of CPU, which would stall the event loop.
from fastmcp import Client
from fastmcp.client.transports import SSETransport, StreamableHttpTransport

from agentbox.crds.fields import parse_duration
from agentbox.crds.mcpserver import MCPServerSpec


async def list_tools(spec: MCPServerSpec, token: str | None, headers: dict[str, str]) -> list[dict[str, str]]:
    timeout = parse_duration(spec.timeout).total_seconds()
    transport_class: Any = SSETransport if spec.transport == "sse" else StreamableHttpTransport
    transport = transport_class(spec.url, headers=headers or None, auth=token)
    async with asyncio.timeout(timeout):
        async with Client(transport, timeout=timeout) as client:
            tools = await client.list_tools()
    return [{"name": tool.name, "description": (tool.description or "")[:4096]} for tool in tools]
