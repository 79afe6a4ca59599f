"""System prompts: global (platform), org (admins) and user scopes, and their composition."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import Field

from agentbox.api.app import Services, services
from agentbox.api.auth import Principal, authenticate, tenant_member
from agentbox.api.problems import FieldError, ProblemError, not_found, problem_responses
from agentbox.api.prompts import (
    ComposedPrompt,
    PromptCache,
    PromptError,
    PromptPart,
    RenderUnavailable,
    check_template,
    injection_signals,
)
from agentbox.api.routers.common import AuditedRoute, audit_details, audit_target, audited_transaction
from agentbox.api.routers.models import ApiModel

router = APIRouter(prefix="/api/v1/prompts", tags=["prompts"], route_class=AuditedRoute)
log = logging.getLogger("agentbox.api.prompts")
Scope = Literal["global", "org", "user"]
Name = Annotated[str, Field(min_length=1, max_length=200)]
Priority = Annotated[int, Field(ge=-1000, le=1000)]


class PromptBody(ApiModel):
    name: Name
    content: Annotated[str, Field(max_length=100_000)]
    priority: Priority = 0
    is_template: bool = False
    enabled: bool = True


class PromptCreate(PromptBody):
    scope: Scope


class PromptView(ApiModel):
    id: uuid.UUID
    scope: Scope
    name: str
    content: str
    priority: int
    is_template: bool
    enabled: bool
    user_id: str | None
    version: int
    created_at: datetime
    updated_at: datetime
    signals: list[str] = Field(default_factory=list, description="Injection heuristics this text matched.")


class ComposedView(ApiModel):
    text: str
    version: str
    signals: list[str]


_COLUMNS = ("id, scope, name, content, priority, is_template, enabled, user_id, version, created_at, "
            "updated_at")


def _view(row: asyncpg.Record, signals: list[str] | None = None) -> PromptView:
    return PromptView(**dict(row), signals=signals or [])


def _content_problem(message: str) -> ProblemError:
    return ProblemError(422, "Unprocessable Content", f"body.content: {message}",
                        errors=[FieldError(field="body.content", message=message, type="value_error")])


async def _check_content(shared: Services, principal: Principal, body: PromptBody) -> list[str]:
    """Refuse content compose could not use: too long, or a template that does not render (within the
    budget) with the variables compose gives it. Returns the injection signals the text matches."""
    if len(body.content) > shared.settings.prompt_max_chars:
        raise _content_problem(f"longer than {shared.settings.prompt_max_chars} characters")
    if body.is_template:
        trial = compose_variables(principal, session_variables("example-session", "claude-code", None))
        try:
            await check_template(body.content, trial, max_chars=shared.settings.prompt_max_chars,
                                 render_seconds=shared.settings.prompt_render_timeout_seconds)
        except PromptError as exc:
            raise _content_problem(str(exc)) from exc
        except RenderUnavailable as exc:
            raise _render_unavailable(exc) from exc
    return [signal.pattern for signal in injection_signals(
        PromptPart(id="new", scope="user", content=body.content), body.content)]


def _render_unavailable(error: RenderUnavailable) -> ProblemError:
    return ProblemError(503, "Service Unavailable", str(error), headers={"Retry-After": "1"})


def _may_write(principal: Principal, scope: str, owner: str | None) -> bool:
    if scope == "global":
        return principal.is_platform
    if principal.is_platform or principal.org is None:
        return False
    return principal.is_admin or (scope == "user" and owner == principal.sub)


def _note_signals(request: Request, shared: Services, signals: list[str]) -> None:
    if signals:
        shared.metrics.prompt_injection_signals.inc()
        log.warning("prompt injection signals", extra={"signals": signals})
        audit_details(request, injection_signals=signals)


async def _member_or_platform(principal: Principal = Depends(authenticate)) -> Principal:
    """An org member, or the platform operator (global prompts). A dependency, so a token without an org
    gets its 403 before the body is even validated."""
    if not principal.is_platform and principal.org is None:
        raise ProblemError(403, "Forbidden", "the token names no organisation (app_metadata.org_id)")
    return principal


@router.post("", status_code=201, response_model=PromptView, name="prompt.create",
             responses=problem_responses(400, 401, 403, 413, 422, 503))
async def create_prompt(body: PromptCreate, request: Request,
                        principal: Principal = Depends(_member_or_platform),
                        shared: Services = Depends(services)) -> PromptView:
    audit_target(request, f"system_prompt/{body.scope}", scope=body.scope, name=body.name)
    if not _may_write(principal, body.scope, principal.sub):
        raise ProblemError(403, "Forbidden", f"you may not write {body.scope} prompts")
    signals = await _check_content(shared, principal, body)
    _note_signals(request, shared, signals)
    org = None if body.scope == "global" else principal.org
    user = principal.sub if body.scope == "user" else None
    async with audited_transaction(request, principal) as conn:
        row = await conn.fetchrow(
            f"INSERT INTO system_prompts (scope, org_id, user_id, name, content, priority, is_template, "  # noqa: S608
            f"enabled, created_by) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING {_COLUMNS}",
            body.scope, org, user, body.name, body.content, body.priority, body.is_template, body.enabled,
            principal.sub)
        audit_target(request, f"system_prompt/{row['id']}")
    return _view(row, signals)


def _visible_clause(principal: Principal) -> tuple[str, list[Any]]:
    """Row security limits rows to the org (and global); this narrows user prompts to their owner."""
    if principal.is_platform or principal.is_admin:
        return "TRUE", []
    return "(scope <> 'user' OR user_id = $1)", [principal.sub]


@router.get("", response_model=list[PromptView], responses=problem_responses(401, 403, 503))
async def list_prompts(request: Request, principal: Principal = Depends(_member_or_platform),
                       scope: Scope | None = None) -> list[PromptView]:
    clause, args = _visible_clause(principal)
    if scope is not None:
        args.append(scope)
        clause += f" AND scope = ${len(args)}"
    async with audited_transaction(request, principal) as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM system_prompts WHERE {clause} "  # noqa: S608
                                "ORDER BY scope, priority DESC, name", *args)
    return [_view(row) for row in rows]


def session_variables(name: str | None, runtime: str | None, model: str | None) -> dict[str, Any]:
    """What a template sees as `session`: one shape for session creation, the compose endpoint and the
    write-time trial render."""
    return {"name": name, "runtime": runtime, "model": model}


def compose_variables(principal: Principal, session: dict[str, Any]) -> dict[str, Any]:
    return {"user": {"id": principal.sub}, "org": {"id": principal.org}, "session": session}


async def compose_for(conn: asyncpg.Connection, shared: Services, principal: Principal,
                      session: dict[str, Any]) -> ComposedPrompt:
    """The caller's composed prompt: enabled global, org and own user prompts (one home for sessions
    and the compose endpoint)."""
    rows = await conn.fetch(
        "SELECT id, scope, content, priority, is_template, version FROM system_prompts "
        "WHERE enabled AND (scope <> 'user' OR user_id = $1)", principal.sub)
    parts = [PromptPart(id=str(row["id"]), scope=row["scope"], content=row["content"],
                        priority=row["priority"], is_template=row["is_template"], version=str(row["version"]))
             for row in rows]
    cache: PromptCache = shared.extras.setdefault("prompt_cache", PromptCache())
    try:
        return await cache.compose(parts, compose_variables(principal, session),
                                   max_part_chars=shared.settings.prompt_max_chars,
                                   max_total_chars=shared.settings.composed_prompt_max_chars,
                                   render_seconds=shared.settings.prompt_render_timeout_seconds)
    except RenderUnavailable as exc:
        raise _render_unavailable(exc) from exc
    except PromptError as exc:
        # Stored prompts passed the write-time checks: one failing now (a template that misbehaves only
        # with these variables, limits lowered since) is the stored data's fault, not the caller's.
        log.error("a stored prompt cannot be composed",
                  extra={"prompt_id": exc.part_id, "field": exc.field, "error": str(exc)})
        if exc.part_id is None:
            raise ProblemError(500, "Internal Server Error",
                               f"the stored prompts cannot be composed: {exc}") from exc
        raise ProblemError(500, "Internal Server Error",
                           f"stored prompt {exc.part_id} cannot be composed: {exc}; fix or disable it "
                           f"(PUT /api/v1/prompts/{exc.part_id})",
                           extensions={"prompt_id": exc.part_id}) from exc


@router.get("/compose", response_model=ComposedView, responses=problem_responses(401, 403, 422, 500, 503))
async def compose_prompt(request: Request, principal: Principal = Depends(tenant_member),
                         shared: Services = Depends(services),
                         runtime: Annotated[str | None, Query(max_length=32)] = None,
                         session: Annotated[str | None, Query(max_length=63)] = None) -> ComposedView:
    async with audited_transaction(request, principal) as conn:
        composed = await compose_for(conn, shared, principal, session_variables(session, runtime, None))
    return ComposedView(text=composed.text, version=composed.version,
                        signals=sorted({signal.pattern for signal in composed.signals}))



async def _fetch_visible(conn: asyncpg.Connection, principal: Principal, prompt_id: uuid.UUID,
                         lock: bool = False) -> asyncpg.Record:
    clause, args = _visible_clause(principal)
    args.append(prompt_id)
    row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM system_prompts WHERE {clause} "  # noqa: S608
                              f"AND id = ${len(args)}{' FOR UPDATE' if lock else ''}", *args)
    if row is None:
        raise not_found("prompt", str(prompt_id))
    return row


@router.get("/{prompt_id}", response_model=PromptView, responses=problem_responses(401, 403, 404, 422, 503))
async def get_prompt(prompt_id: uuid.UUID, request: Request,
                     principal: Principal = Depends(_member_or_platform)) -> PromptView:
    async with audited_transaction(request, principal) as conn:
        return _view(await _fetch_visible(conn, principal, prompt_id))


@router.put("/{prompt_id}", response_model=PromptView, name="prompt.update",
            responses=problem_responses(400, 401, 403, 404, 413, 422, 503))
async def update_prompt(prompt_id: uuid.UUID, body: PromptBody, request: Request,
                        principal: Principal = Depends(_member_or_platform),
                        shared: Services = Depends(services)) -> PromptView:
    audit_target(request, f"system_prompt/{prompt_id}")
    signals = await _check_content(shared, principal, body)
    async with audited_transaction(request, principal) as conn:
        current = await _fetch_visible(conn, principal, prompt_id, lock=True)
        if not _may_write(principal, current["scope"], current["user_id"]):
            raise ProblemError(403, "Forbidden", f"you may not change {current['scope']} prompts")
        _note_signals(request, shared, signals)
        row = await conn.fetchrow(
            f"UPDATE system_prompts SET name = $2, content = $3, priority = $4, is_template = $5, "  # noqa: S608
            f"enabled = $6 WHERE id = $1 RETURNING {_COLUMNS}",
            prompt_id, body.name, body.content, body.priority, body.is_template, body.enabled)
    return _view(row, signals)


@router.delete("/{prompt_id}", status_code=204, response_class=Response, name="prompt.delete",
               responses=problem_responses(401, 403, 404, 422, 503))
async def delete_prompt(prompt_id: uuid.UUID, request: Request,
                        principal: Principal = Depends(_member_or_platform)) -> Response:
    audit_target(request, f"system_prompt/{prompt_id}")
    async with audited_transaction(request, principal) as conn:
        current = await _fetch_visible(conn, principal, prompt_id, lock=True)
        if not _may_write(principal, current["scope"], current["user_id"]):
            raise ProblemError(403, "Forbidden", f"you may not delete {current['scope']} prompts")
        await conn.execute("DELETE FROM system_prompts WHERE id = $1", prompt_id)
    return Response(status_code=204)


__all__ = ["compose_for", "router", "session_variables"]
