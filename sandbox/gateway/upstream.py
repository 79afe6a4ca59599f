"""One upstream MCP server: its credentials, one live client session reused across calls, its breaker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from fastmcp import Client
from fastmcp.client.transports import ClientTransport, SSETransport, StdioTransport, StreamableHttpTransport
from fastmcp.exceptions import DisabledError, NotFoundError, ToolError
from fastmcp.server.context import Context
from fastmcp.server.providers import Provider
from fastmcp.server.providers.proxy import ProxyProvider
from fastmcp.telemetry import inject_trace_context
from fastmcp.tools import ToolResult
from fastmcp.tools.base import InputRequiredToolResult, RawStructuredToolResult
from fastmcp.utilities.json_schema import is_object_schema
from mcp.client.session import ClientSession
from mcp.shared.exceptions import MCPError
from mcp.types import METHOD_NOT_FOUND
from mcp_types import (
    CLIENT_CAPABILITIES_META_KEY,
    CLIENT_INFO_META_KEY,
    PROTOCOL_VERSION_META_KEY,
    SERVER_INFO_META_KEY,
    CallToolRequest,
    CallToolRequestParams,
    CallToolResult,
    Implementation,
    InputRequiredResult,
    PaginatedRequestParams,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import TypeAdapter

from agentbox.sandbox.gateway.breaker import CircuitBreaker
from agentbox.sandbox.gateway.config import Breaker, Upstream
from agentbox.sandbox.gateway.metrics import GatewayMetrics
from agentbox.sandbox.gateway.wire import PostDispatcher

log = logging.getLogger("agentbox.gateway")
T = TypeVar("T")

# Connecting (spawning a stdio server, the MCP handshake) gets at most this long, however long the
# configured per-call timeout is: a connect that hangs must not hold tools/list hostage.
CONNECT_TIMEOUT_CAP = 15.0
CLIENT_INFO = Implementation(name="agentbox-gateway", version="0.1.0")
# A tool call's answer, checked against the protocol by the session. Unlike the session's call_tool, the
# structured content is not revalidated against the tool's output schema on every call: the agent's own
# client checks it against the schema the gateway lists.
CALL_RESULT = TypeAdapter(CallToolResult | InputRequiredResult)


# `_meta` keys that describe one connection (the agent's to the gateway, or the gateway's to an upstream),
# so never cross from one to the other. FastMCP's proxy applies the same rule in private helpers.
CONNECTION_META_KEYS = frozenset(
    {PROTOCOL_VERSION_META_KEY, CLIENT_INFO_META_KEY, CLIENT_CAPABILITIES_META_KEY})


def crossing(meta: Mapping[str, Any] | None, *also_dropped: str) -> dict[str, Any]:
    """The part of a request's or result's `_meta` that may pass through the gateway."""
    dropped = CONNECTION_META_KEYS.union(also_dropped)
    return {key: value for key, value in (meta or {}).items() if key not in dropped}


class UpstreamUnavailable(ToolError):
    """The upstream cannot be reached now; the message says which one and why."""


def build_transport(spec: Upstream) -> ClientTransport:
    """The transport carries only this upstream's own credentials, never anything from the caller."""
    if spec.transport == "stdio":
        assert spec.command is not None
        return StdioTransport(spec.command, list(spec.args), env=spec.process_env() or None, keep_alive=True)
    assert spec.url is not None
    if spec.transport == "sse":
        return SSETransport(spec.url, headers=http_headers(spec))
    return StreamableHttpTransport(spec.url, headers=http_headers(spec))


def http_headers(spec: Upstream) -> dict[str, str]:
    """This upstream's configured headers and bearer token, read now (a rotated Secret applies on the
    next connect)."""
    headers = {header.name: header.resolve() for header in spec.headers}
    token = spec.auth.token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return headers


class UpstreamConnection:
    def __init__(self, spec: Upstream, breaker: Breaker, metrics: GatewayMetrics) -> None:
        self.spec = spec
        self.name = spec.name
        self.breaker = CircuitBreaker(breaker.failure_threshold, breaker.reset_seconds)
        self.metrics = metrics
        self._client: Client | None = None
        # Tool calls to a streamable-HTTP upstream on the 2026-07-28 wire (wire.py); None otherwise.
        self._calls: ClientSession | None = None
        self._call_tools: frozenset[str] = frozenset()
        self._posts: PostDispatcher | None = None
        self._connect_lock = asyncio.Lock()
        self.provider: Provider = self._build_provider()

    def _build_provider(self) -> Provider:
        provider = ProxyProvider(self.client)
        if self.spec.tools.allow:
            provider.enable(names=set(self.spec.tools.allow), only=True)
        if self.spec.tools.deny:
            provider.disable(names=set(self.spec.tools.deny))  # added last, so deny wins over allow
        return provider

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    def status(self) -> dict[str, object]:
        return {
            "transport": self.spec.transport,
            "connected": self.connected,
            "breaker": self.breaker.state,
            "lastError": self.breaker.last_error,
        }

    async def client(self) -> Client:
        """The live session, (re)connected on demand. Fails fast while the breaker is open."""
        if self.breaker.state == "open":
            raise self._unavailable()
        if self.connected:
            assert self._client is not None
            return self._client
        async with self._connect_lock:
            if self.connected:
                assert self._client is not None
                return self._client
            await self._drop_client()
            try:
                self._client = await self._connect()
                await self._open_call_session(self._client)
            except Exception as error:
                await self._drop_client()
                self._record_failure(f"connect failed: {describe(error)}")
                raise self._unavailable() from error
            log.info("upstream %s connected", self.name)
            self.metrics.up.labels(self.name).set(1)
            return self._client

    async def _connect(self) -> Client:
        timeout = min(self.spec.timeout_seconds, CONNECT_TIMEOUT_CAP)
        client = Client(build_transport(self.spec), timeout=self.spec.timeout_seconds, init_timeout=timeout,
                        client_info=CLIENT_INFO)
        try:
            async with asyncio.timeout(timeout):
                await client.__aenter__()
        except BaseException:
            await self._close(client)
            raise
        return client

    async def _open_call_session(self, client: Client) -> None:
        """A session that sends tool calls as single POSTs, when the upstream speaks that wire."""
        negotiated = client.session.discover_result
        if self.spec.transport != "streamable-http" or negotiated is None:
            return
        assert self.spec.url is not None
        self._posts = PostDispatcher(self.spec.url, http_headers(self.spec))
        session = ClientSession(dispatcher=self._posts, client_info=CLIENT_INFO)  # call() times each call
        session.adopt(negotiated)
        # A session learns each tool's Mcp-Param-* headers (x-mcp-header in its input schema) from a
        # listing; a tool the upstream adds later is called through the FastMCP client's session.
        names: set[str] = set()
        async with asyncio.timeout(min(self.spec.timeout_seconds, CONNECT_TIMEOUT_CAP)):
            page = await session.list_tools()
            names.update(tool.name for tool in page.tools)
            while page.next_cursor:
                page = await session.list_tools(params=PaginatedRequestParams(cursor=page.next_cursor))
                names.update(tool.name for tool in page.tools)
        self._calls, self._call_tools = session, frozenset(names)

    async def call(self, run: Callable[[], Awaitable[ToolResult]]) -> ToolResult:
        """Run one proxied tool call under this upstream's breaker, timeout and metrics."""
        if not self.breaker.allow():
            self.metrics.errors.labels(self.name, "unavailable").inc()
            raise self._unavailable()
        self.metrics.calls.labels(self.name).inc()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.spec.timeout_seconds):
                result = await run()
        except (NotFoundError, DisabledError):
            self.breaker.record_success()  # the upstream answered; the tool is simply not there
            raise
        except UpstreamUnavailable:
            self.metrics.errors.labels(self.name, "unavailable").inc()
            raise
        except TimeoutError as error:
            self.metrics.errors.labels(self.name, "timeout").inc()
            await self.fail(f"tool call timed out after {self.spec.timeout_seconds:g}s")
            raise ToolError(f"upstream {self.name!r}: tool call timed out after "
                            f"{self.spec.timeout_seconds:g}s") from error
        except Exception as error:
            self.metrics.errors.labels(self.name, "transport").inc()
            await self.fail(describe(error))
            raise ToolError(f"upstream {self.name!r} failed: {describe(error)}") from error
        finally:
            self.metrics.latency.labels(self.name).observe(time.perf_counter() - started)
        if result.is_error:
            self.metrics.errors.labels(self.name, "tool").inc()
        self.breaker.record_success()
        return result

    async def forward(self, request: CallToolRequestParams, context: Context | None,
                      generic: Callable[[], Awaitable[ToolResult]]) -> ToolResult:
        """One tool call straight to the upstream session (the single-POST one where there is one),
        skipping FastMCP's generic proxy path (its per-call client re-entry, span, schema walk) and the
        session's output-schema revalidation (CALL_RESULT). Anything beyond a plain
        call (a denied or unknown tool, task-augmented or multi-round calls, a legacy-protocol upstream)
        takes the generic path, so FastMCP keeps answering those exactly as before."""
        tool = request.name.partition("_")[2]
        plain = request.task is None and request.input_responses is None and request.request_state is None
        found = await self.provider.get_tool(tool) if plain and self.spec.tools.permits(tool) else None
        if found is None:
            return await generic()
        client = await self.client()
        if client.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            return await generic()
        inbound = context.request_context.meta if context is not None and context.request_context else None
        meta = inject_trace_context(crossing(inbound)) or None
        session = self._calls if self._calls and tool in self._call_tools else client.session
        params = CallToolRequestParams(name=tool, arguments=request.arguments, _meta=meta)
        result = await session.send_request(CallToolRequest(params=params), CALL_RESULT)
        if isinstance(result, InputRequiredResult):
            return InputRequiredToolResult(result)
        assert isinstance(result, CallToolResult)
        # Converted as FastMCP's ProxyTool does, so callers see the same result either way.
        # The upstream's serverInfo stamp is dropped too: the gateway's own server stamps its identity.
        structured = result.structured_content
        reply_meta = crossing(result.meta, SERVER_INFO_META_KEY) or None
        raw = not isinstance(structured, dict) or (
            found.output_schema is not None and not is_object_schema(found.output_schema))
        if "structured_content" in result.model_fields_set and raw:
            return RawStructuredToolResult(content=result.content, structured_content=structured,
                                           meta=reply_meta, is_error=result.is_error)
        return ToolResult(content=result.content, structured_content=structured, meta=reply_meta,
                          is_error=result.is_error)

    async def check(self) -> None:
        """Health pass: reconnect a dead session (a stdio server that exited is restarted here) or ping."""
        if self.breaker.state == "open":
            return
        try:
            if not self.connected:
                await self.client()
                self.breaker.record_success()
                return
            assert self._client is not None
            async with asyncio.timeout(min(self.spec.timeout_seconds, CONNECT_TIMEOUT_CAP)):
                await self._client.ping()
            self.breaker.record_success()
        except MCPError as error:
            if error.error.code != METHOD_NOT_FOUND:  # a server without ping still answered: it is alive
                await self.fail(f"ping failed: {describe(error)}")
        except UpstreamUnavailable:
            pass  # already recorded by client()
        except Exception as error:
            await self.fail(f"ping failed: {describe(error)}")

    async def fail(self, reason: str) -> None:
        """A broken call or ping: count it against the breaker and drop the session so the next use
        reconnects (a restarted HTTP server no longer knows the old session id)."""
        self._record_failure(reason)
        async with self._connect_lock:
            await self._drop_client()

    def _record_failure(self, reason: str) -> None:
        was = self.breaker.state
        self.breaker.record_failure(reason)
        self.metrics.up.labels(self.name).set(0)
        if self.breaker.state == "open" and was != "open":
            log.warning("upstream %s: circuit open for %.0fs: %s", self.name, self.breaker.reset_seconds,
                        reason)
        else:
            log.warning("upstream %s: %s", self.name, reason)

    def _unavailable(self) -> UpstreamUnavailable:
        reason = self.breaker.last_error or "not connected"
        retry = self.breaker.retry_in()
        suffix = f"; retrying in {retry:.1f}s" if retry else ""
        return UpstreamUnavailable(f"upstream {self.name!r} is unavailable ({reason}){suffix}")

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        posts, self._posts, self._calls = self._posts, None, None
        if posts is not None:
            await posts.aclose()
        if client is not None:
            await self._close(client)

    @staticmethod
    async def _close(client: Client) -> None:
        try:
            async with asyncio.timeout(5):
                await client.close()
        except Exception as error:  # a broken session may fail to close cleanly; it is gone either way
            log.debug("closing upstream client: %s", describe(error))

    async def aclose(self) -> None:
        async with self._connect_lock:
            await self._drop_client()
        with contextlib.suppress(KeyError):  # never connected, so never labelled
            self.metrics.up.remove(self.name)


def describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."
