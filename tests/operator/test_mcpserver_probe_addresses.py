"""The operator's MCP probe goes only where the address policy allows (pure, no cluster): a tenant's
MCPServer cannot point it at cloud metadata or, unless the deployment allows private networks, at the
cluster's own network; the refusal shows on the MCPServer, and nothing was sent."""

import asyncio
import logging
import subprocess
import sys

import kopf
import pytest
from kopf._core.engines import posting  # kopf's Event context, which only a running operator sets

from agentbox.crds import mcpserver
from agentbox.crds.mcpserver import MCPServerSpec
from agentbox.operator.handlers.mcpserver import _probe, check
from agentbox.operator.settings import OperatorSettings

NAMESPACE = "tenant-acme"


class StatusKube:
    def __init__(self) -> None:
        self.statuses: list[dict] = []

    async def merge_patch(self, kind, namespace, name, patch, sub=None):
        assert (kind, sub) == (mcpserver.KIND, "status")
        self.statuses.append(patch["status"])
        return patch


@pytest.fixture
async def listener():
    """A TCP listener on 127.0.0.1 that counts the connections it gets: (its port, the counts)."""
    connections: list[int] = []

    async def accept(reader, writer):
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], connections
    server.close()
    await server.wait_closed()


def spec(url: str) -> MCPServerSpec:
    return MCPServerSpec.model_validate({"transport": "streamable-http", "url": url, "timeout": "2s"})


@pytest.mark.parametrize("url, kind", [("http://169.254.169.254/mcp", "link-local"),
                                       ("http://10.96.0.1:443/mcp", "private-network"),
                                       ("http://[::1]:8080/mcp", "loopback")])
async def test_a_refused_address_is_not_probed_and_says_why(url, kind):
    tools, reason, why = await _probe(StatusKube(), NAMESPACE, spec(url), allow_private=False)
    assert tools is None and reason == "AddressRefused"
    assert why.startswith("not probed: the host") and kind in why and "the operator does not contact" in why


async def test_nothing_is_sent_to_a_refused_address_and_the_setting_allows_private_ones(listener):
    port, connections = listener
    _, reason, why = await _probe(StatusKube(), NAMESPACE, spec(f"http://127.0.0.1:{port}/mcp"),
                                  allow_private=False)
    assert reason == "AddressRefused" and "loopback" in why and connections == []
    _, reason, why = await _probe(StatusKube(), NAMESPACE, spec(f"http://127.0.0.1:{port}/mcp"),
                                  allow_private=True)
    assert reason == "ProbeFailed" and "not probed" not in why and connections  # tried: no MCP server there


async def test_link_local_stays_refused_whatever_the_setting():
    _, reason, why = await _probe(StatusKube(), NAMESPACE, spec("http://169.254.169.254/mcp"),
                                  allow_private=True)
    assert reason == "AddressRefused" and why.startswith("not probed") and "link-local" in why


async def test_the_refusal_is_the_mcpservers_status():
    quiet = kopf.OperatorSettings()
    quiet.posting.enabled, quiet.posting.level = False, logging.CRITICAL + 1
    posting.settings_var.set(quiet)
    kube = StatusKube()
    body = {"apiVersion": mcpserver.API_VERSION, "kind": mcpserver.KIND,
            "metadata": {"name": "meta", "namespace": NAMESPACE, "uid": "uid-meta", "generation": 1},
            "spec": {"transport": "sse", "url": "http://169.254.169.254/sse"}}
    await check(kube, body, OperatorSettings())
    [status] = kube.statuses
    [ready] = [condition for condition in status["conditions"] if condition["type"] == "Ready"]
    assert status["phase"] == "Unreachable" and ready["reason"] == "AddressRefused"
    assert ready["message"].startswith("not probed: the host '169.254.169.254' resolves to a link-local")


def test_fastmcp_is_loaded_with_the_probe_module_not_in_the_first_probe():
    loaded = subprocess.run([sys.executable, "-c", "import sys, agentbox.operator.probe; "
                             "print('fastmcp' in sys.modules)"], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "True"
