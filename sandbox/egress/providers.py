"""The provider routes: the agent's model API base URL. A request under /<provider>/ goes on to that
provider's upstream with every credential the agent sent dropped and the real key added; nothing else
is reachable here, and the key goes nowhere else (redirects are handed back to the agent, unfollowed)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from agentbox.sandbox.egress.config import Provider

log = logging.getLogger("agentbox.egress")

# Never passed on: what carries a credential (the agent holds only a placeholder), what the client sets
# for the next hop itself, and hop-by-hop headers (RFC 9110 section 7.6.1).
CREDENTIAL_HEADERS = frozenset({"authorization", "x-api-key", "x-goog-api-key", "proxy-authorization",
                                "cookie"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "host", "content-length"})
# A model's answer may pause for minutes between streamed events; connecting may not.
UPSTREAM_TIMEOUT = httpx.Timeout(connect=15.0, read=600.0, write=60.0, pool=15.0)


def _problem(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"title": "egress proxy", "status": status, "detail": detail}, status_code=status,
                        media_type="application/problem+json")


def build_app(provider: Provider | None, client: httpx.AsyncClient | None = None) -> Starlette:
    """The routes for `provider` (none: every route answers 404), plus /healthz."""
    key = provider.key() if provider is not None else None
    upstream = client or httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT, follow_redirects=False, trust_env=False)

    async def forward(request: Request) -> Response:
        name = request.path_params["provider"]
        if provider is None or name != provider.name:
            known = f"only /{provider.name}/ is routed" if provider else "this session has no provider key"
            return _problem(404, f"no provider route /{name}/: {known}")
        assert key is not None
        headers = [(name_, value) for name_, value in request.headers.items()
                   if name_ not in CREDENTIAL_HEADERS and name_ not in HOP_BY_HOP]
        headers.append((provider.key_header, f"{provider.key_prefix}{key}"))
        url = f"{provider.upstream}/{request.path_params['path']}"
        outgoing = upstream.build_request(request.method, url, params=request.query_params.multi_items(),
                                          headers=headers, content=request.stream())
        try:
            answer = await upstream.send(outgoing, stream=True)
        except httpx.HTTPError as error:
            log.warning("provider unreachable", extra={"provider": name, "error": type(error).__name__})
            return _problem(502, f"the {name} API could not be reached ({type(error).__name__})")
        kept = {name_: value for name_, value in answer.headers.items() if name_ not in HOP_BY_HOP}
        return StreamingResponse(answer.aiter_raw(), status_code=answer.status_code, headers=kept,
                                 background=BackgroundTask(answer.aclose))

    async def healthz(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        async with upstream:
            yield

    return Starlette(routes=[Route("/healthz", healthz),
                             Route("/{provider}/{path:path}", forward,
                                   methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])],
                     lifespan=lifespan)
