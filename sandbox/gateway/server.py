"""The gateway: one streamable-HTTP MCP endpoint over every configured upstream, each namespaced."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastmcp import FastMCP
from fastmcp.server.middleware import Middleware, MiddlewareContext
from fastmcp.server.providers import Provider
from fastmcp.server.providers.aggregate import AggregateProvider
from fastmcp.server.transforms import Namespace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from agentbox.sandbox.gateway.config import ConfigError, GatewayConfig, load_config
from agentbox.sandbox.gateway.metrics import GatewayMetrics
from agentbox.sandbox.gateway.upstream import UpstreamConnection

log = logging.getLogger("agentbox.gateway")


class UpstreamRouter(Provider):
    """Serves whichever set of upstreams the current config names; a reload swaps the set atomically."""

    def __init__(self) -> None:
        super().__init__()
        self.current = AggregateProvider()  # one failing upstream is logged and skipped in listings
        self.by_namespace: dict[str, Provider] = {}

    def swap(self, namespaced: dict[str, Provider]) -> None:
        routes = AggregateProvider()
        for provider in namespaced.values():
            routes.providers.append(provider)
        self.current, self.by_namespace = routes, namespaced

    async def _list_tools(self) -> Sequence[Any]:
        return await self.current.list_tools()

    async def _get_tool(self, name: str, version: Any = None) -> Any:
        # Straight to the one upstream the prefix names, rather than asking every upstream per call.
        provider = self.by_namespace.get(name.partition("_")[0])
        return await provider.get_tool(name, version) if provider else None

    async def _list_resources(self) -> Sequence[Any]:
        return await self.current.list_resources()

    async def _get_resource(self, uri: str, version: Any = None) -> Any:
        return await self.current.get_resource(uri, version)

    async def _list_resource_templates(self) -> Sequence[Any]:
        return await self.current.list_resource_templates()

    async def _get_resource_template(self, uri: str, version: Any = None) -> Any:
        return await self.current.get_resource_template(uri, version)

    async def _list_prompts(self) -> Sequence[Any]:
        return await self.current.list_prompts()

    async def _get_prompt(self, name: str, version: Any = None) -> Any:
        return await self.current.get_prompt(name, version)


class UpstreamCallMiddleware(Middleware):
    """Puts each tool call under its upstream's breaker, timeout and metrics."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def on_call_tool(self, context: MiddlewareContext, call_next: Any) -> Any:
        upstream = self.gateway.upstream_for_tool(context.message.name)
        if upstream is None:
            return await call_next(context)  # FastMCP answers an unknown tool itself
        return await upstream.call(lambda: upstream.forward(context.message, context.fastmcp_context,
                                                            lambda: call_next(context)))


class Gateway:
    def __init__(self, config_path: Path, *, poll_seconds: float = 1.0, health_seconds: float = 5.0) -> None:
        self.config_path = config_path
        self.poll_seconds = poll_seconds
        self.health_seconds = health_seconds
        self.metrics = GatewayMetrics()
        self.config: GatewayConfig | None = None
        self.config_error: str | None = None
        self.upstreams: dict[str, UpstreamConnection] = {}
        self.router = UpstreamRouter()
        self.mcp = FastMCP("agentbox-gateway", providers=[self.router],
                           middleware=[UpstreamCallMiddleware(self)])
        self._seen_file: tuple[int, int, int] | None = None
        self._reload_lock = asyncio.Lock()
        self.mcp.custom_route("/healthz", ["GET"])(self._healthz)
        self.mcp.custom_route("/readyz", ["GET"])(self._readyz)
        self.mcp.custom_route("/metrics", ["GET"])(self._metrics)

    def upstream_for_tool(self, tool: str) -> UpstreamConnection | None:
        # Upstream names are DNS labels (no underscore), so the namespace ends at the first "_".
        namespace, sep, _ = tool.partition("_")
        return self.upstreams.get(namespace) if sep else None

    async def reload(self) -> bool:
        """Load the file if it changed; a bad file keeps the last good config. True when applied."""
        async with self._reload_lock:
            try:
                stat = await asyncio.to_thread(os.stat, self.config_path)
                signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            except OSError as error:
                signature = None
                if self.config_error is None:
                    log.error("gateway config %s unreadable: %s", self.config_path, error.strerror)
            if signature is not None and signature == self._seen_file:
                return False
            self._seen_file = signature
            try:
                config = await asyncio.to_thread(load_config, self.config_path)
            except ConfigError as error:
                self.config_error = str(error)
                self.metrics.reloads.labels("error").inc()
                kept = "keeping the last good config" if self.config else "no config loaded yet"
                log.error("gateway config rejected (%s): %s", kept, error)
                return False
            self.config_error = None
            if config == self.config:
                return False
            await self._apply(config)
            self.metrics.reloads.labels("applied").inc()
            return True

    async def _apply(self, config: GatewayConfig) -> None:
        if self.config is not None and config.listen != self.config.listen:
            log.warning("gateway listen address changes need a restart; keeping %s", self.config.listen)
        previous = self.upstreams
        upstreams: dict[str, UpstreamConnection] = {}
        for spec in config.upstreams:
            kept = previous.get(spec.name)
            reuse = kept is not None and kept.spec == spec and self.config is not None \
                and self.config.breaker == config.breaker
            upstreams[spec.name] = kept if reuse and kept else UpstreamConnection(spec, config.breaker,
                                                                                  self.metrics)
        self.router.swap({name: upstream.provider.wrap_transform(Namespace(name))
                          for name, upstream in upstreams.items()})
        self.upstreams = upstreams
        self.config = config
        retired = [upstream for name, upstream in previous.items() if upstreams.get(name) is not upstream]
        await asyncio.gather(*(upstream.aclose() for upstream in retired))
        await asyncio.gather(*(upstream.check() for upstream in upstreams.values() if not upstream.connected))
        log.info("gateway config applied: upstreams %s", sorted(upstreams) or "none")

    async def check_upstreams(self) -> None:
        await asyncio.gather(*(upstream.check() for upstream in list(self.upstreams.values())))

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self.poll_seconds)
            try:
                await self.reload()
            except Exception:  # the watcher must outlive any one bad reload
                log.exception("gateway config reload failed")

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_seconds)
            await self.check_upstreams()

    def readiness(self) -> dict[str, Any]:
        statuses = {name: upstream.status() for name, upstream in self.upstreams.items()}
        return {
            "ready": self.config is not None,
            "configError": self.config_error,
            "connected": sorted(name for name, status in statuses.items() if status["connected"]),
            "degraded": sorted(name for name, status in statuses.items() if not status["connected"]),
            "upstreams": statuses,
        }

    async def _healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def _readyz(self, request: Request) -> Response:
        body = self.readiness()
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    async def _metrics(self, request: Request) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def aclose(self) -> None:
        await asyncio.gather(*(upstream.aclose() for upstream in self.upstreams.values()))

    async def serve(self, host: str | None = None, port: int | None = None) -> None:
        await self.reload()
        listen = self.config.listen if self.config else GatewayConfig().listen
        # JSON bodies: the MCP library then answers in the request's own task, with no per-request task
        # group and event stream; the agent's calls lose only mid-call progress notifications.
        app = self.mcp.http_app(path="/mcp", json_response=True)
        server = uvicorn.Server(uvicorn.Config(app, host=host or listen.host, port=port or listen.port,
                                               log_config=None, access_log=False, lifespan="on"))
        watchers = [asyncio.create_task(self._watch_config()), asyncio.create_task(self._watch_health())]
        try:
            await server.serve()
        finally:
            for task in watchers:
                task.cancel()
            for task in watchers:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self.aclose()
