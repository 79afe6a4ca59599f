"""Organisations (service_role only): the org row plus its tenant namespace, created together."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, Request
from pydantic import Field

from agentbox.api.app import Services, services
from agentbox.api.auth import Principal, platform_operator
from agentbox.api.kube import Kube, tenant_namespace
from agentbox.api.problems import ProblemError, problem_responses
from agentbox.api.routers.common import AuditedRoute, audit_target, audited_transaction, kube
from agentbox.api.routers.models import ApiModel

router = APIRouter(prefix="/api/v1/orgs", tags=["orgs"], route_class=AuditedRoute)
# The operator grants the API its rights in a new tenant namespace in well under a second when it runs.
TENANT_ACCESS_WAIT_SECONDS = 15


class OrgCreate(ApiModel):
    id: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", min_length=1, max_length=56,
                             description="A DNS label: it names the tenant namespace tenant-<id>.")]
    name: Annotated[str, Field(min_length=1, max_length=200)]


class OrgView(ApiModel):
    id: str
    name: str
    namespace: str
    created_at: datetime


@router.post("", status_code=201, response_model=OrgView, name="org.create",
             responses=problem_responses(400, 401, 403, 409, 413, 422, 503))
async def create_org(body: OrgCreate, request: Request, principal: Principal = Depends(platform_operator),
                     shared: Services = Depends(services), client: Kube = Depends(kube)) -> OrgView:
    namespace = tenant_namespace(body.id, shared.settings.tenant_namespace_prefix)
    audit_target(request, f"org/{body.id}", namespace=namespace)
    # A row that fails to commit leaves its namespace behind, empty: the API may not delete namespaces, and
    # a retry of the same org takes the namespace over (it carries the org's label).
    async with audited_transaction(request, principal, org=body.id) as conn:
        try:
            row = await conn.fetchrow("INSERT INTO organizations (id, name) VALUES ($1, $2) "
                                      "RETURNING id, name, created_at", body.id, body.name)
        except asyncpg.UniqueViolationError as exc:
            raise ProblemError(409, "Conflict", f"org {body.id!r} already exists") from exc
        # The row is written but uncommitted: if the namespace fails, the row goes with the rollback.
        await client.ensure_tenant_namespace(namespace, body.id)
        # Only then is the org usable: its first MCP credentials or session may follow at once.
        if not await client.wait_for_tenant_access(namespace, TENANT_ACCESS_WAIT_SECONDS):
            raise ProblemError(503, "Service Unavailable",
                               f"namespace {namespace} exists but the operator has not granted the API "
                               f"access to it in {TENANT_ACCESS_WAIT_SECONDS} s (is the operator running?); "
                               "retry shortly", headers={"Retry-After": "5"})
    return OrgView(id=row["id"], name=row["name"], namespace=namespace, created_at=row["created_at"])
