"""MCPServer status from a real probe: a FastMCP server on 127.0.0.1 answering, then gone."""

import asyncio
import subprocess
import sys

import pytest
from fixtures.polling import eventually
from operator_harness import free_port, mcpserver_manifest

from agentbox.crds import mcpserver

pytestmark = pytest.mark.cluster

SERVER = """
import sys
from fastmcp import FastMCP
mcp = FastMCP("probe-target")

@mcp.tool
def echo(text: str) -> str:
    '''Say it back.'''
    return text

@mcp.tool
def shout(text: str) -> str:
    '''Say it louder.'''
    return text.upper()

mcp.run(transport="http", host="127.0.0.1", port=int(sys.argv[1]), show_banner=False, log_level="warning")
"""


async def _listening(port):
    try:
        _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


async def _status(ops, namespace, name, phase):
    body = await ops.get(mcpserver.KIND, namespace, name)
    status = (body or {}).get("status") or {}
    return status if status.get("phase") == phase else None


async def test_http_server_is_probed_for_tools_and_unreachable_is_reported(operator, ops, tenant):
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port)])
    try:
        await ops.create(
            mcpserver_manifest(
                "live", tenant, transport="streamable-http", url=f"http://127.0.0.1:{port}/mcp", timeout="5s"
            )
        )
        status = await eventually(lambda: _status(ops, tenant, "live", "Ready"), timeout=90)
        assert sorted(tool["name"] for tool in status["tools"]) == ["echo", "shout"]
        assert status["toolCount"] == 2 and status["lastProbeTime"]
        assert status["conditions"][0]["reason"] == "ProbeSucceeded"
    finally:
        server.terminate()
        server.wait(timeout=10)

    await ops.create(
        mcpserver_manifest(
            "dead", tenant, transport="sse", url=f"http://127.0.0.1:{free_port()}/sse", timeout="2s"
        )
    )
    status = await eventually(lambda: _status(ops, tenant, "dead", "Unreachable"), timeout=30)
    condition = status["conditions"][0]
    assert (
        condition["status"] == "False"
        and condition["reason"] == "ProbeFailed"
        and "retry in" in condition["message"]
    )
