"""Model provider API keys (anthropic, gemini, openai): an org's, set by its admins, and each user's own,
which wins over the org's for that user's sessions. Write-only: stored encrypted, rendered into a Secret
only the sessions' egress proxies mount, and answered as "set, when, by whom", never the key.

A Kubernetes write that fails takes the database change back with it; one that succeeded is put back when
the transaction then fails (the audit row says `failed` either way).
"""

from __future__ import annotations

import base64
import contextlib
import uuid
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal

import asyncpg
from fastapi import APIRouter, Depends, Request, Response
from pydantic import Field, StringConstraints

from agentbox.api import provider_keys
from agentbox.api.app import Services, services
from agentbox.api.auth import Principal, org_admin, tenant_member
from agentbox.api.kube import Kube, KubeError, tenant_namespace
from agentbox.api.problems import ProblemError, not_found, problem_responses
from agentbox.api.routers.common import (
    AuditedRoute,
    audit_target,
    audited_transaction,
    key_ring,
    kube,
    kube_problem,
    tenant_kube_problem,
)
from agentbox.api.routers.models import ApiModel
from agentbox.crds.providers import Provider

router = APIRouter(prefix="/api/v1/provider-keys", tags=["provider-keys"], route_class=AuditedRoute)
Scope = Literal["org", "user"]


class ProviderKeyBody(ApiModel):
    model_config = ApiModel.model_config | {"json_schema_extra": {"examples": [{"apiKey": "<key>"}]}}

    api_key: Annotated[str, StringConstraints(min_length=8, max_length=4096,
                                              pattern=r"^[\x21-\x7e]+$")] = Field(
        description="The provider's API key: visible ASCII, no spaces. Write-only: stored encrypted, never "
                    "returned; sessions' agents get a placeholder and reach the provider through their "
                    "egress proxy, which adds it.")


class ProviderKeyView(ApiModel):
    provider: Provider
    scope: Scope = Field(description="org: the organisation's key; user: the caller's own, which wins.")
    created_by: str | None
    created_at: datetime
    updated_at: datetime
    version: int


def _view(row: asyncpg.Record) -> ProviderKeyView:
    return ProviderKeyView(provider=row["provider"], scope="org" if row["user_id"] is None else "user",
                           created_by=row["created_by"], created_at=row["created_at"],
                           updated_at=row["updated_at"], version=row["version"])


_COLUMNS = "id, user_id, provider, created_by, created_at, updated_at, version"


@router.get("", response_model=list[ProviderKeyView], responses=problem_responses(401, 403, 503))
async def list_keys(request: Request, principal: Principal = Depends(tenant_member)) -> list[ProviderKeyView]:
    """The org's keys and the caller's own (metadata only)."""
    async with audited_transaction(request, principal) as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM provider_keys WHERE user_id IS NULL OR user_id = $1 "  # noqa: S608
                                "ORDER BY provider, user_id NULLS FIRST", principal.sub)
    return [_view(row) for row in rows]


@contextlib.asynccontextmanager
async def _secret_written(client: Kube, namespace: str, name: str, org: str,
                          user: str | None) -> AsyncIterator[None]:
    """Checks the Secret of that name is ours (or absent) before the block writes it; puts the previous
    content back when the block fails after its write."""
    try:
        before = await client.get_secret(namespace, name)
    except KubeError as exc:
        raise kube_problem(exc) from exc
    if before is not None and (before.metadata.labels or {}).get(provider_keys.SCOPE_LABEL) is None:
        raise ProblemError(409, "Conflict", f"a Secret named {name} exists in {namespace} and is not a "
                                            "provider key of the platform's")
    try:
        yield
    except BaseException:
        with contextlib.suppress(KubeError):  # best effort: the request's own error stands
            if before is None:
                await client.delete_secret(namespace, name)
            else:
                data = {key: base64.b64decode(value).decode() for key, value in (before.data or {}).items()}
                await client.apply_secret(namespace, name, data, provider_keys.labels(org, user))
        raise


async def _set(request: Request, principal: Principal, shared: Services, client: Kube, provider: Provider,
               user: str | None, body: ProviderKeyBody) -> ProviderKeyView:
    org = principal.org or ""
    scope = "org" if user is None else "user"
    audit_target(request, f"provider_key/{scope}/{provider}", provider=provider, scope=scope)
    keys = key_ring(shared)
    namespace = tenant_namespace(org, shared.settings.tenant_namespace_prefix)
    name = provider_keys.secret_name(user, provider)
    async with _secret_written(client, namespace, name, org, user), \
            audited_transaction(request, principal) as conn:
        row_id = await conn.fetchval("SELECT id FROM provider_keys WHERE provider = $1 AND user_id IS NOT "
                                     "DISTINCT FROM $2 FOR UPDATE", provider, user)
        if row_id is None:
            row_id = uuid.uuid4()
            try:
                await conn.execute("INSERT INTO provider_keys (id, org_id, user_id, provider, key_enc, "
                                   "created_by) VALUES ($1, $2, $3, $4, $5, $6)", row_id, org, user, provider,
                                   keys.encrypt(body.api_key, provider_keys.cipher(org, row_id)),
                                   principal.sub)
            except asyncpg.UniqueViolationError as exc:
                raise ProblemError(409, "Conflict", f"the {scope} key for {provider} was set concurrently; "
                                                    "retry") from exc
        else:
            await conn.execute("UPDATE provider_keys SET key_enc = $2 WHERE id = $1", row_id,
                               keys.encrypt(body.api_key, provider_keys.cipher(org, row_id)))
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM provider_keys WHERE id = $1", row_id)  # noqa: S608
        try:
            await client.apply_secret(namespace, name, {provider_keys.SECRET_KEY: body.api_key},
                                      provider_keys.labels(org, user))
        except KubeError as exc:
            raise tenant_kube_problem(exc, namespace) from exc
    return _view(row)


async def _delete(request: Request, principal: Principal, shared: Services, client: Kube, provider: Provider,
                  user: str | None) -> Response:
    org = principal.org or ""
    scope = "org" if user is None else "user"
    audit_target(request, f"provider_key/{scope}/{provider}", provider=provider, scope=scope)
    namespace = tenant_namespace(org, shared.settings.tenant_namespace_prefix)
    name = provider_keys.secret_name(user, provider)
    async with _secret_written(client, namespace, name, org, user), \
            audited_transaction(request, principal) as conn:
        deleted = await conn.fetchval("DELETE FROM provider_keys WHERE provider = $1 AND user_id IS NOT "
                                      "DISTINCT FROM $2 RETURNING id", provider, user)
        if deleted is None:
            raise not_found(f"{scope} key for", provider)
        await client.delete_secret(namespace, name)
    return Response(status_code=204)


WRITE_RESPONSES = problem_responses(400, 401, 403, 409, 413, 422, 502, 503)


@router.put("/org/{provider}", response_model=ProviderKeyView, name="provider_key.org.set",
            responses=WRITE_RESPONSES)
async def set_org_key(provider: Provider, body: ProviderKeyBody, request: Request,
                      principal: Principal = Depends(org_admin), shared: Services = Depends(services),
                      client: Kube = Depends(kube)) -> ProviderKeyView:
    """Set (or replace) the organisation's key for `provider`: sessions of users without their own use it."""
    return await _set(request, principal, shared, client, provider, None, body)


@router.delete("/org/{provider}", status_code=204, response_class=Response, name="provider_key.org.delete",
               responses=problem_responses(401, 403, 404, 409, 422, 502, 503))
async def delete_org_key(provider: Provider, request: Request, principal: Principal = Depends(org_admin),
                         shared: Services = Depends(services), client: Kube = Depends(kube)) -> Response:
    return await _delete(request, principal, shared, client, provider, None)


@router.put("/user/{provider}", response_model=ProviderKeyView, name="provider_key.user.set",
            responses=WRITE_RESPONSES)
async def set_user_key(provider: Provider, body: ProviderKeyBody, request: Request,
                       principal: Principal = Depends(tenant_member), shared: Services = Depends(services),
                       client: Kube = Depends(kube)) -> ProviderKeyView:
    """Set (or replace) the caller's own key for `provider`: their new sessions use it, not the org's."""
    return await _set(request, principal, shared, client, provider, principal.sub, body)


@router.delete("/user/{provider}", status_code=204, response_class=Response, name="provider_key.user.delete",
               responses=problem_responses(401, 403, 404, 409, 422, 502, 503))
async def delete_user_key(provider: Provider, request: Request, principal: Principal = Depends(tenant_member),
                          shared: Services = Depends(services), client: Kube = Depends(kube)) -> Response:
    return await _delete(request, principal, shared, client, provider, principal.sub)
