"""Probes and metrics: /livez (process), /healthz (alias kept for load balancers), /readyz (dependencies)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Literal

from fastapi import APIRouter, Depends, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from agentbox.api.app import Services, services
from agentbox.api.problems import ProblemError, problem_responses

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ok"] = "ok"
    checks: dict[str, str]


@router.get("/livez", response_model=Health)
async def livez() -> Health:
    return Health()


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health()


async def _check(name: str, probe: Callable[[], Awaitable[object]] | None, limit: float) -> tuple[str, str]:
    if probe is None:
        return name, "not configured"
    try:
        async with asyncio.timeout(limit):
            await probe()
    except TimeoutError:
        return name, f"timed out after {limit:g}s"
    except Exception as exc:
        return name, f"unreachable: {type(exc).__name__}"
    return name, "ok"


@router.get("/readyz", response_model=Readiness, responses=problem_responses(503))
async def readyz(shared: Services = Depends(services)) -> Readiness:
    timeout = shared.settings.readiness_timeout_seconds
    database_probe = shared.database.ping if shared.database is not None else None
    kube_probe = shared.kube.ping if shared.kube is not None else None
    checks = dict(await asyncio.gather(_check("database", database_probe, timeout),
                                       _check("kubernetes", kube_probe, timeout)))
    caches = {"sessions cache": shared.sessions_cache, "mcp servers cache": shared.mcp_servers_cache}
    for name, cache in caches.items():
        if cache is not None:  # ready after the first list; a later resync falls back to live reads instead
            checks[name] = "ok" if cache.resyncs else "waiting for the first list"
    if any(result != "ok" for result in checks.values()):
        raise ProblemError(503, "Service Unavailable", "a dependency is not ready",
                           extensions={"checks": checks})
    return Readiness(checks=checks)


@router.get("/metrics", response_class=Response, responses={200: {"content": {CONTENT_TYPE_LATEST: {}},
                                                                   "description": "Prometheus metrics"},
                                                              **problem_responses()})
async def metrics(shared: Services = Depends(services)) -> Response:
    return Response(generate_latest(shared.metrics.registry), media_type=CONTENT_TYPE_LATEST)
