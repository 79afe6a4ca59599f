"""Talks to a session's agent runner (the agentapi-style surface on port 3284) with its runner token.

Where the runner is: `AGENTBOX_RUNNER_URL_OVERRIDE` (a template with {name} and {namespace}, for an API
running outside the cluster or tests), else the session's `status.endpoint` (in-cluster Service DNS).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

# An event stream stays open while the agent is idle: no read timeout, the rest bounded.
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)


class RunnerUnavailable(Exception):
    """The runner did not answer, or answered with a server error."""


class RunnerClient:
    def __init__(self, http: httpx.AsyncClient, *, url_override: str | None = None) -> None:
        self._http = http
        self._override = url_override

    def base_url(self, session: dict[str, Any]) -> str | None:
        metadata = session["metadata"]
        if self._override:
            return self._override.format(name=metadata["name"], namespace=metadata["namespace"]).rstrip("/")
        endpoint = (session.get("status") or {}).get("endpoint")
        return endpoint.rstrip("/") if endpoint else None

    async def call(self, base_url: str, token: str, method: str, path: str,
                   json: Any = None) -> httpx.Response:
        try:
            response = await self._http.request(method, f"{base_url}{path}", json=json,
                                                headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise RunnerUnavailable(f"the session's runner did not answer ({type(exc).__name__})") from exc
        if response.status_code >= 500 or response.status_code in (401, 403):
            # A 401/403 from the runner means our token is stale: the caller's fault it is not.
            raise RunnerUnavailable(f"the session's runner answered {response.status_code}")
        return response

    async def events(self, base_url: str, token: str) -> AsyncIterator[bytes]:
        """The runner's server-sent events, passed through byte for byte until either side closes."""
        request = self._http.build_request("GET", f"{base_url}/events",
                                           headers={"Authorization": f"Bearer {token}",
                                                    "Accept": "text/event-stream"},
                                           timeout=_STREAM_TIMEOUT)
        try:
            response = await self._http.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise RunnerUnavailable(f"the session's runner did not answer ({type(exc).__name__})") from exc
        if response.status_code != 200:
            await response.aclose()
            raise RunnerUnavailable(f"the session's runner answered {response.status_code}")

        async def stream() -> AsyncIterator[bytes]:
            try:
                async for chunk in response.aiter_raw():
                    yield chunk
            except httpx.HTTPError:
                return  # the runner went away: end the stream, the client reconnects
            finally:
                await response.aclose()

        return stream()
