"""The app factory: settings in, a FastAPI app with every router, middleware and problem handler out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from agentbox.api.observability import Metrics, ObservabilityMiddleware
from agentbox.api.problems import Problem, install_problem_handlers, internal_error, problem_response
from agentbox.api.settings import Settings


@dataclass
class Services:
    """What the routers share. Each field is built once per app in the lifespan (or injected by tests)."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    database: Any = None
    kube: Any = None
    verifier: Any = None
    runner: Any = None
    # Watch-backed caches (agentbox.api.watch_cache) of AgentSessions and MCPServers; None: live reads.
    sessions_cache: Any = None
    mcp_servers_cache: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


def services(request: Request) -> Services:
    return request.app.state.services


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` when a streamed body passes the limit. An HTTPException, because FastAPI turns
    any other error met while reading the body into a 400 but re-raises these, so the app's problem
    handler answers the 413."""

    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class BodyLimitMiddleware:
    """413 for a body over the limit, whether announced by Content-Length or only found while streaming
    (a chunked body has no Content-Length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = f"the request body exceeds {max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._too_large(scope, receive, send)
            return
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge(self.detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if started:
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem_response(None, 413, "Content Too Large", self.detail)
        await response(scope, receive, send)


async def open_services(shared: Services, stack: AsyncExitStack) -> None:
    """Build the database pool, Kubernetes client, token verifier and runner client from settings; each
    one registers its own close on `stack`. A dependency that is down does not stop the start: /readyz
    says so and requests answer 503 until it is back."""
    import httpx

    from agentbox.api.auth import JwksCache, TokenVerifier
    from agentbox.api.db import Database
    from agentbox.api.kube import Kube
    from agentbox.api.portforward import PortForwarder
    from agentbox.api.runner_client import RunnerClient

    settings = shared.settings
    if settings.database_url is not None:
        shared.database = Database(settings.database_url.get_secret_value())
        stack.push_async_callback(shared.database.close)
    try:
        shared.kube = await Kube.connect(request_timeout=settings.kube_timeout_seconds)
        stack.push_async_callback(shared.kube.close)
    except Exception:
        logging.getLogger("agentbox.api").warning("no Kubernetes configuration; Kubernetes routes answer 503")
    else:
        await start_caches(shared, stack)
    http = httpx.AsyncClient(timeout=settings.runner_timeout_seconds)
    stack.push_async_callback(http.aclose)
    forwarder = None
    if settings.runner_transport == "port-forward" and shared.kube is not None:
        forwarder = PortForwarder(shared.kube.api.configuration,
                                  idle_seconds=settings.runner_forward_idle_seconds,
                                  connect_timeout=settings.kube_timeout_seconds)
        stack.push_async_callback(forwarder.close)
    shared.runner = RunnerClient(http, forwarder=forwarder)
    if settings.jwt_issuer:
        jwks = None
        if settings.jwt_jwks_url:
            jwks_http = httpx.AsyncClient(timeout=settings.jwks_fetch_timeout_seconds)
            stack.push_async_callback(jwks_http.aclose)
            jwks = JwksCache(settings.jwt_jwks_url, jwks_http,
                             cooldown=settings.jwks_refetch_cooldown_seconds,
                             max_age=settings.jwks_max_age_seconds, max_stale=settings.jwks_max_stale_seconds)
        secret = settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret else None
        shared.verifier = TokenVerifier(issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                                        leeway=settings.jwt_leeway_seconds, hs256_secret=secret, jwks=jwks)


async def start_caches(shared: Services, stack: AsyncExitStack) -> None:
    """Watch AgentSessions and MCPServers into caches until `stack` closes (reads fall back to the API
    server until each has listed once)."""
    from agentbox.api.watch_cache import WatchCache
    from agentbox.crds import agentsession, mcpserver

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    for attribute, kind in (("sessions_cache", agentsession), ("mcp_servers_cache", mcpserver)):
        cache = WatchCache(shared.kube.custom, kind.GROUP, kind.VERSION, kind.PLURAL,
                           request_timeout=shared.settings.kube_timeout_seconds)
        setattr(shared, attribute, cache)
        stack.push_async_callback(stop, asyncio.create_task(cache.run(), name=f"watch-{kind.PLURAL}"))


def create_app(settings: Settings | None = None, *, services_override: Services | None = None) -> FastAPI:
    """Build the app. `services_override` hands in ready-made services (tests); otherwise the lifespan
    builds them from settings and closes them on shutdown."""
    from agentbox.api.routers import mount_routers

    settings = settings or (services_override.settings if services_override else Settings())
    shared = services_override or Services(settings=settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if services_override is None:
                await open_services(shared, stack)
            yield

    app = FastAPI(title="agentbox control-plane API", version="0.1.0", lifespan=lifespan,
                  openapi_url="/openapi.json", docs_url="/docs", redoc_url=None)
    app.state.services = shared
    install_problem_handlers(app)
    mount_routers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ObservabilityMiddleware, metrics=shared.metrics, on_unhandled=internal_error)
    if settings.trusted_proxies:  # outermost: every layer sees the client the proxy names
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)
    _declare_problem_schema(app)
    return app


PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def _declare_problem_schema(app: FastAPI) -> None:
    """Errors come back as problem documents: the OpenAPI spec says so for every operation."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = original()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", Problem.model_json_schema(ref_template="#/components/schemas/{model}"))
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                for status, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if status.startswith(("4", "5")) and "application/json" in content:
                        # FastAPI's default 422 says application/json; ours is a problem document.
                        content.pop("application/json")
                        content["application/problem+json"] = {"schema": PROBLEM_REF}
                    if status == "422":
                        response["description"] = "Unprocessable Content"
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
