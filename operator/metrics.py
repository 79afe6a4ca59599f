"""Prometheus metrics of the operator: reconcile counts, durations, errors, sessions by phase."""

import time
from collections import Counter as Tally
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("agentbox_operator_reconciles_total", "Reconciliations by resource and outcome",
                     ["resource", "outcome"])
RECONCILE_SECONDS = Histogram("agentbox_operator_reconcile_duration_seconds", "Reconciliation duration",
                              ["resource"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("agentbox_operator_errors_total", "Reconciliations that raised", ["resource", "error"])
SESSIONS = Gauge("agentbox_operator_sessions", "AgentSessions by phase", ["phase"])

_phases: dict[tuple[str, str], str] = {}


def record_phase(key: tuple[str, str], phase: str | None) -> None:
    """Remember one session's phase (None: gone) and refresh the per-phase gauge."""
    before = Tally(_phases.values())
    if phase is None:
        _phases.pop(key, None)
    else:
        _phases[key] = phase
    after = Tally(_phases.values())
    for name in set(before) | set(after):
        SESSIONS.labels(phase=name).set(after.get(name, 0))


@asynccontextmanager
async def reconciling(resource: str) -> AsyncIterator[None]:
    started = time.perf_counter()
    try:
        yield
    except BaseException as error:
        RECONCILES.labels(resource=resource, outcome="error").inc()
        ERRORS.labels(resource=resource, error=type(error).__name__).inc()
        raise
    else:
        RECONCILES.labels(resource=resource, outcome="ok").inc()
    finally:
        RECONCILE_SECONDS.labels(resource=resource).observe(time.perf_counter() - started)


def serve(host: str, port: int) -> None:
    """Serve /metrics from prometheus_client's own background thread (it never touches the loop)."""
    if port:
        start_http_server(port, addr=host)
