"""A real FastMCP server the sandbox tests start as a process: streamable-http, sse or stdio.

Every HTTP request's headers are appended to --record (one JSON object a line) before any check, so a
test can prove which credentials did, and did not, reach this upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os

import uvicorn
from fastmcp import Context, FastMCP
from starlette.responses import JSONResponse


def build_server(label: str) -> FastMCP:
    mcp = FastMCP(f"upstream-{label}")

    @mcp.tool
    def echo(text: str) -> str:
        """Return the text, tagged with this upstream's label."""
        return f"{label}:{text}"

    @mcp.tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    @mcp.tool
    def pid() -> int:
        """The server's process id."""
        return os.getpid()

    @mcp.tool
    def getenv(name: str) -> str:
        """A variable of the server's environment (empty when unset)."""
        return os.environ.get(name, "")

    @mcp.tool
    async def slow(seconds: float) -> str:
        """Sleep, then answer."""
        await asyncio.sleep(seconds)
        return "done"

    @mcp.tool
    def meta(ctx: Context) -> dict:
        """The `_meta` this call arrived with."""
        return dict(ctx.request_context.meta or {}) if ctx.request_context else {}

    @mcp.tool
    def fail(message: str) -> str:
        """Always raises: an upstream tool error."""
        raise ValueError(message)

    return mcp


class RecordAndRequireToken:
    def __init__(self, app, record: str | None, token: str | None) -> None:
        self.app, self.record, self.token = app, record, token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {key.decode().lower(): value.decode() for key, value in scope["headers"]}
        if self.record:
            with open(self.record, "a") as sink:
                sink.write(json.dumps(headers) + "\n")
        if self.token and headers.get("authorization") != f"Bearer {self.token}":
            return await JSONResponse({"error": "unauthorized"}, status_code=401)(scope, receive, send)
        return await self.app(scope, receive, send)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=["streamable-http", "sse", "stdio"], required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--label", default="up")
    parser.add_argument("--token")
    parser.add_argument("--record")
    args = parser.parse_args()
    mcp = build_server(args.label)
    if args.transport == "stdio":
        mcp.run(transport="stdio", show_banner=False)
        return
    app = mcp.http_app(path="/mcp" if args.transport == "streamable-http" else "/sse",
                       transport="http" if args.transport == "streamable-http" else "sse")
    app = RecordAndRequireToken(app, args.record, args.token)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    main()
