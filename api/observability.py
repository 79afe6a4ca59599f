"""Request ids, JSON logs and Prometheus metrics, in one pure-ASGI middleware (streams stay unbuffered)."""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from pythonjsonlogger.json import JsonFormatter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

REQUEST_ID_HEADER = "x-request-id"
# A caller's request id is kept only if it is short and plain; anything else is replaced.
_ACCEPTABLE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{8,128}")
_request_id: ContextVar[str | None] = ContextVar("agentbox_request_id", default=None)
access_log = logging.getLogger("agentbox.api.access")


def current_request_id() -> str | None:
    return _request_id.get()


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id()
        return True


def configure_logging(level: str = "INFO") -> None:
    """One JSON object per line on stderr, each carrying the request id of the request that logged it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter("{asctime}{levelname}{name}{message}", style="{",
                                       rename_fields={"asctime": "time", "levelname": "level",
                                                      "name": "logger"}))
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    # The access line comes from our middleware (it knows the route template and request id).
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


class Metrics:
    """A registry per app, so several apps (tests) never collide on the global default registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("agentbox_api_requests_total", "HTTP requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("agentbox_api_request_duration_seconds", "Time to the response head",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.audit_writes = Counter("agentbox_api_audit_rows_total", "Audit rows written",
                                    ["outcome"], registry=self.registry)
        self.oauth_callbacks_refused = Counter("agentbox_api_oauth_callbacks_refused_total",
                                               "OAuth callbacks refused for a missing, malformed or unknown "
                                               "state (all counted; audited up to a rate)",
                                               ["reason"], registry=self.registry)
        self.prompt_injection_signals = Counter("agentbox_api_prompt_injection_signals_total",
                                                "Prompt texts flagged by the injection heuristics",
                                                registry=self.registry)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    # Unmatched paths share one label so random URLs cannot grow the metric's cardinality.
    return getattr(route, "path", None) or "<unmatched>"


class ObservabilityMiddleware:
    """Tags each request with an id, counts and times it, logs it, and turns an unhandled error into
    `on_unhandled` (an ASGI app answering 500) while the request id is still known."""

    def __init__(self, app: ASGIApp, metrics: Metrics, on_unhandled: ASGIApp) -> None:
        self.app = app
        self.metrics = metrics
        self.on_unhandled = on_unhandled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope["headers"]).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = offered if _ACCEPTABLE_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        token = _request_id.set(request_id)
        started = time.perf_counter()
        status = 500
        response_started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
                route = _route_template(scope)
                self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logging.getLogger("agentbox.api").exception("unhandled error")
            if response_started:
                raise
            await self.on_unhandled(scope, receive, send_with_id)
        finally:
            route = _route_template(scope)
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            if route not in _QUIET_ROUTES:
                elapsed_ms = round((time.perf_counter() - started) * 1000, 2)
                access_log.info("request", extra={"method": scope["method"], "route": route,
                                                  "path": scope["path"], "status": status,
                                                  "duration_ms": elapsed_ms})
            _request_id.reset(token)


_QUIET_ROUTES = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
