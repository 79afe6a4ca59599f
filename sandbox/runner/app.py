"""The agentapi HTTP surface on port 3284, bearer-token protected (except /healthz and /readyz)."""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Request, UploadFile
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from agentbox.sandbox.runner.bridge import (
    AgentBridge,
    AgentBusy,
    AgentFailed,
    AgentNeedsAuth,
    AgentUnavailable,
)
from agentbox.sandbox.runner.conversation import Conversation
from agentbox.sandbox.runner.workspace import WorkspaceError, confine

UPLOAD_CHUNK = 1024 * 1024


class MessageBody(BaseModel):
    content: str = Field(min_length=1, max_length=1_000_000)
    type: Literal["user", "raw"] = "user"


def create_app(conversation: Conversation, bridge: AgentBridge, *, token: str, workspace: Path,
               upload_max_bytes: int) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge.start()
        try:
            yield
        finally:
            await bridge.aclose()
            await conversation.flush()

    app = FastAPI(title="agentbox runner", lifespan=lifespan, docs_url=None, redoc_url=None)
    expected = f"Bearer {token}".encode()

    def require_token(request: Request) -> None:
        presented = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(presented, expected):
            raise HTTPException(401, "a valid runner token is required", {"WWW-Authenticate": "Bearer"})

    authorized = [Depends(require_token)]

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "agent": bridge.state}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """The pod's readiness: 200 only while the agent can take a message, so a session whose agent is
        starting, restarting, refusing to authenticate or given up on does not read Ready."""
        body = {"agent": bridge.state} | ({"detail": bridge.detail} if bridge.detail else {})
        return JSONResponse(body, status_code=200 if bridge.state == "ready" else 503)

    @app.get("/status", dependencies=authorized)
    async def status() -> dict:
        """agentapi's status (stable, running; needs_auth or failed when the agent cannot take a message),
        with the agent's own state and its last failure, if any."""
        body = conversation.status_json() | {"agent": bridge.state, "restarts": bridge.restarts}
        if bridge.detail:
            body["detail"] = bridge.detail
        if bridge.last_failure is not None:
            body["last_error"] = bridge.last_failure.as_json()
        return body

    @app.get("/messages", dependencies=authorized)
    async def messages() -> dict:
        return {"messages": [message.as_json() for message in conversation.messages]}

    @app.post("/message", dependencies=authorized)
    async def message(body: MessageBody) -> dict:
        try:
            await bridge.send(body.content, body.type)
        except AgentBusy as error:
            raise HTTPException(409, str(error)) from error
        except (AgentNeedsAuth, AgentFailed) as error:  # no Retry-After: only a new pod helps
            raise HTTPException(503, str(error)) from error
        except AgentUnavailable as error:
            raise HTTPException(503, str(error), {"Retry-After": "2"}) from error
        return {"ok": True}

    @app.get("/events", dependencies=authorized)
    async def events(request: Request) -> EventSourceResponse:
        async def stream() -> AsyncIterator[dict]:
            async with conversation.subscribe() as queue:
                while True:
                    event = await queue.get()
                    if event is None:  # this client fell too far behind and was cut off
                        return
                    yield {"event": event.kind, "data": json.dumps(event.data)}

        return EventSourceResponse(stream(), ping=15, send_timeout=30)

    @app.post("/upload", dependencies=authorized)
    async def upload(request: Request, file: UploadFile, path: str | None = Form(None),
                     upload_path: str | None = Form(None, alias="uploadPath")) -> dict:
        declared = int(request.headers.get("content-length") or 0)
        if declared > upload_max_bytes + 64 * 1024:  # multipart framing is small; the file is what counts
            raise HTTPException(413, f"file: larger than the {upload_max_bytes} byte limit")
        requested = path or upload_path or file.filename or ""
        try:
            target = await run_in_threadpool(confine, workspace, str(requested))
        except WorkspaceError as error:
            raise HTTPException(400, f"path: {error}") from error
        size = await _store(file, target, upload_max_bytes)
        conversation.touch()
        return {"ok": True, "filePath": str(target), "size": size}

    @app.exception_handler(HTTPException)
    async def problem(request: Request, error: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": error.detail, "status": error.status_code}, error.status_code,
                            headers=error.headers)

    return app


async def _store(file: UploadFile, target: Path, limit: int) -> int:
    """Copy in chunks to a temporary file beside the target, then rename: an oversized or interrupted
    upload leaves nothing behind."""
    await run_in_threadpool(target.parent.mkdir, parents=True, exist_ok=True)
    handle, staging = await run_in_threadpool(tempfile.mkstemp, dir=target.parent, prefix=".upload-")
    size = 0
    try:
        with os.fdopen(handle, "wb") as sink:
            while chunk := await file.read(UPLOAD_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"file: larger than the {limit} byte limit")
                await run_in_threadpool(sink.write, chunk)
        await run_in_threadpool(os.replace, staging, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            await run_in_threadpool(os.unlink, staging)
        raise
    return size
