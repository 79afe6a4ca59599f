"""The demo stdio MCP server's tools: pure where they can be, and once as the process a gateway starts."""

from __future__ import annotations

import sys

import pytest
from fastmcp import Client
from fastmcp.client.transports import StdioTransport
from fastmcp.exceptions import ToolError

from agentbox.sandbox.demo_tools import MAX_READ_BYTES, build_server, echo, read_text_inside, shout


def test_echo_and_shout_are_deterministic():
    assert echo("Hello, wörld") == "Hello, wörld"
    assert shout("quiet please") == "QUIET PLEASE"
    assert shout("ß") == "SS"


def test_read_file_reads_text_under_the_root(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("first line\n")
    assert read_text_inside(tmp_path, "notes/a.txt") == "first line\n"
    assert read_text_inside(tmp_path, str(tmp_path / "notes" / "a.txt")) == "first line\n"


@pytest.mark.parametrize(("path", "message"), [
    ("../outside.txt", "outside the workspace"),
    ("/etc/hostname", "outside the workspace"),
    ("link.txt", "outside the workspace"),
    ("missing.txt", "no file 'missing.txt'"),
    ("folder", "'folder' is a directory"),
    ("big.txt", f"larger than {MAX_READ_BYTES} bytes"),
    ("binary.bin", "not UTF-8 text"),
])
def test_read_file_refuses_clearly(tmp_path, path, message):
    root = tmp_path / "root"
    (root / "folder").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("secret")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    (root / "big.txt").write_bytes(b"x" * (MAX_READ_BYTES + 1))
    (root / "binary.bin").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ToolError, match=message):
        read_text_inside(root, path)


async def test_the_server_offers_the_three_tools(tmp_path):
    (tmp_path / "hello.txt").write_text("hi from the workspace")
    async with Client(build_server(tmp_path)) as client:
        assert sorted(tool.name for tool in await client.list_tools()) == ["echo", "read_file", "shout"]
        assert (await client.call_tool("read_file", {"path": "hello.txt"})).data == "hi from the workspace"
        refused = await client.call_tool("read_file", {"path": "../x"}, raise_on_error=False)
        assert refused.is_error and "outside the workspace" in refused.content[0].text


async def test_it_runs_as_a_stdio_server_the_way_a_gateway_starts_it(tmp_path):
    (tmp_path / "hello.txt").write_text("from disk")
    transport = StdioTransport(sys.executable, ["-m", "agentbox.sandbox.demo_tools", "--root", str(tmp_path)])
    async with Client(transport) as client:
        assert (await client.call_tool("shout", {"text": "quiet"})).data == "QUIET"
        assert (await client.call_tool("read_file", {"path": "hello.txt"})).data == "from disk"
