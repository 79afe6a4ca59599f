"""Every error the API answers is an RFC 9457 problem document (`application/problem+json`)."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from agentbox.api.db import DatabaseUnavailable
from agentbox.api.observability import current_request_id

PROBLEM_MEDIA_TYPE = "application/problem+json"


class FieldError(BaseModel):
    field: str
    message: str
    type: str


class Problem(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "about:blank"
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


class ProblemError(Exception):
    """Raise anywhere in a request to answer with a problem document."""

    def __init__(self, status: int, title: str, detail: str | None = None, *,
                 errors: list[FieldError] | None = None, headers: dict[str, str] | None = None,
                 extensions: dict[str, Any] | None = None):
        super().__init__(detail or title)
        self.extensions = extensions
        self.status = status
        self.title = title
        self.detail = detail
        self.errors = errors
        self.headers = headers


def not_found(kind: str, name: str) -> ProblemError:
    # Another org's objects answer exactly like missing ones: the wording never reveals existence.
    return ProblemError(404, "Not Found", f"{kind} {name!r} not found")


def problem_response(request: Request | None, status: int, title: str, detail: str | None = None, *,
                     errors: list[FieldError] | None = None,
                     headers: dict[str, str] | None = None,
                     extensions: dict[str, Any] | None = None) -> JSONResponse:
    body = Problem(title=title, status=status, detail=detail, errors=errors,
                   instance=request.url.path if request is not None else None,
                   request_id=current_request_id(), **(extensions or {}))
    return JSONResponse(body.model_dump(exclude_none=True), status_code=status, headers=headers,
                        media_type=PROBLEM_MEDIA_TYPE)


def _field_path(location: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in location)


def field_errors(raw_errors: list[dict[str, Any]]) -> list[FieldError]:
    """Pydantic errors as `field` + `message`, the field named by its dotted location (body.spec.name)."""
    return [FieldError(field=_field_path(error.get("loc", ())), message=error.get("msg", "invalid"),
                       type=error.get("type", "value_error")) for error in raw_errors]


_TITLES = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           405: "Method Not Allowed", 409: "Conflict", 413: "Content Too Large",
           415: "Unsupported Media Type", 422: "Unprocessable Content", 429: "Too Many Requests",
           500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


def title_for(status: int) -> str:
    return _TITLES.get(status, "Error")


async def _on_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ProblemError)
    return problem_response(request, exc.status, exc.title, exc.detail, errors=exc.errors,
                            headers=exc.headers, extensions=exc.extensions)


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail if isinstance(exc.detail, str) and exc.detail != title_for(exc.status_code) else None
    return problem_response(request, exc.status_code, title_for(exc.status_code), detail,
                            headers=getattr(exc, "headers", None))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = field_errors(list(exc.errors()))
    if any(error.type == "json_invalid" for error in errors):
        return problem_response(request, 400, "Bad Request", "the request body is not valid JSON",
                                errors=errors)
    fields = ", ".join(dict.fromkeys(error.field for error in errors))
    return problem_response(request, 422, "Unprocessable Content", f"invalid fields: {fields}",
                            errors=errors)


# PostgreSQL's text and jsonb cannot hold U+0000: a NUL anywhere in the input fails the statement.
UNSTORABLE_TEXT = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)
NUL_MESSAGE = "contains NUL (U+0000), which cannot be stored"


async def _on_unstorable_text(request: Request, exc: Exception) -> JSONResponse:
    fields = [f"query.{name}" for name, value in request.query_params.multi_items()
              if "\x00" in name or "\x00" in value]
    if "\x00" in request.url.path:
        fields.append("path")
    errors = [FieldError(field=field, message=NUL_MESSAGE, type="value_error")
              for field in fields or ["body"]]
    return problem_response(request, 422, "Unprocessable Content",
                            f"{', '.join(error.field for error in errors)}: a text value {NUL_MESSAGE}",
                            errors=errors)


# How long a client should wait before retrying a request that met a database outage or restart.
DATABASE_RETRY_AFTER_SECONDS = 2


async def _on_database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The one place a database outage becomes an answer, whichever route met it. Its description
    # (agentbox.api.db: the error type and asyncpg's message, never the DSN) stays in the log.
    logging.getLogger("agentbox.api.db").warning("database unavailable: answering 503",
                                                 extra={"error": str(exc)})
    return problem_response(request, 503, "Service Unavailable", "the database is unavailable; retry shortly",
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)})


async def internal_error(scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI answer to an unhandled error (the observability middleware calls it, request id known)."""
    response = problem_response(None, 500, "Internal Server Error", "an unexpected error occurred")
    await response(scope, receive, send)


def install_problem_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ProblemError, _on_problem)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(DatabaseUnavailable, _on_database_unavailable)
    for error in UNSTORABLE_TEXT:
        app.add_exception_handler(error, _on_unstorable_text)


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries declaring the problem documents a route can answer."""
    return {status: {"model": Problem, "description": title_for(status),
                     "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}}
            for status in statuses}
