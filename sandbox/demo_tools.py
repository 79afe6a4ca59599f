"""A small stdio MCP server with deterministic tools: `python -m agentbox.sandbox.demo_tools [--root DIR]`.

Configure it as a stdio MCP server (command `python`, args `-m agentbox.sandbox.demo_tools`) to try a
session's tool path with nothing outside the pod: the session's gateway starts it as a child process,
in the pod's sidecar or in a local stand-in alike. Its tools:
  echo(text)        the text, unchanged
  shout(text)       the text, upper-cased
  read_file(path)   a UTF-8 text file under the root (default: the working directory), at most 64 KiB
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from fastmcp import FastMCP
from fastmcp.exceptions import ToolError

from agentbox.sandbox.runner.workspace import WorkspaceError, confine

MAX_READ_BYTES = 64 * 1024


def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


def shout(text: str) -> str:
    """Return the text upper-cased."""
    return text.upper()


def read_text_inside(root: Path, path: str) -> str:
    """The UTF-8 text of `path` (relative to `root`, or absolute inside it); a clear ToolError for a path
    outside the root, a missing or non-text file, or one over MAX_READ_BYTES. Blocking."""
    try:
        target = confine(root, path)
        with target.open("rb") as file:
            data = file.read(MAX_READ_BYTES + 1)
    except WorkspaceError as error:
        raise ToolError(str(error)) from error
    except FileNotFoundError as error:
        raise ToolError(f"no file {path!r}") from error
    except IsADirectoryError as error:
        raise ToolError(f"{path!r} is a directory") from error
    except OSError as error:
        raise ToolError(f"cannot read {path!r}: {error.strerror}") from error
    if len(data) > MAX_READ_BYTES:
        raise ToolError(f"{path!r} is larger than {MAX_READ_BYTES} bytes")
    try:
        return data.decode()
    except UnicodeDecodeError as error:
        raise ToolError(f"{path!r} is not UTF-8 text") from error


def build_server(root: Path) -> FastMCP:
    server = FastMCP("agentbox-demo-tools")
    server.add_tool(echo)
    server.add_tool(shout)

    async def read_file(path: str) -> str:
        """Read a UTF-8 text file (at most 64 KiB) under the server's root directory."""
        return await asyncio.to_thread(read_text_inside, root, path)

    server.add_tool(read_file)
    return server


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m agentbox.sandbox.demo_tools",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path.cwd(),
                        help="the directory read_file reads from (default: the working directory)")
    args = parser.parse_args(argv)
    build_server(args.root).run("stdio", show_banner=False)


if __name__ == "__main__":
    main()
