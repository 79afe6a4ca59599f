"""Prometheus metrics of the operator: reconcile counts, durations, errors, sessions by phase."""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RECONCILES = Counter("agentbox_operator_reconciles_total", "Reconciliations by resource and outcome",
                     ["resource", "outcome"])
RECONCILE_SECONDS = Histogram("agentbox_operator_reconcile_duration_seconds", "Reconciliation duration",
                              ["resource"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
ERRORS = Counter("agentbox_operator_errors_total", "Reconciliations that raised", ["resource", "error"])
SESSIONS = Gauge("agentbox_operator_sessions", "AgentSessions by phase", ["phase"])

POOL_CLAIMS = Counter("agentbox_operator_pool_claims_total", "New sessions in a namespace with an "
                      "AgentSessionPool, by outcome: hit (claimed a ready member) or miss (started cold)",
                      ["outcome"])
POOL_CLAIM_SECONDS = Histogram("agentbox_operator_pool_claim_duration_seconds",
                               "Time to claim a pool member (the handover patches)",
                               buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
POOL_READY = Gauge("agentbox_operator_pool_ready_members", "Unclaimed ready members per pool",
                   ["namespace", "pool"])

_phases: dict[tuple[str, str], str] = {}


def record_phase(key: tuple[str, str], phase: str | None) -> None:
    """Remember one session's phase (None: gone) and move the per-phase gauge (O(1) per call)."""
    before = _phases.pop(key, None) if phase is None else _phases.get(key)
    if before == phase:
        return
    if before is not None:
        SESSIONS.labels(phase=before).dec()
    if phase is not None:
        _phases[key] = phase
        SESSIONS.labels(phase=phase).inc()


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
