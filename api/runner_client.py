"""Talks to a session's agent runner (the agentapi-style surface on port 3284) with its runner token.

How the runner is reached (AGENTBOX_RUNNER_TRANSPORT): `service`, the session's `status.endpoint`
(in-cluster Service DNS); `port-forward`, the endpoint's port on the session's pod (`status.podName`)
through the Kubernetes API, for an API running outside the cluster (agentbox.api.portforward).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from agentbox.api.portforward import PortForwarder
from agentbox.api.problems import ProblemError

# An event stream stays open while the agent is idle: no read timeout, the rest bounded.
_STREAM_TIMEOUT = httpx.Timeout(10.0, read=None)


class RunnerUnavailable(Exception):
    """The runner did not answer, or answered with a server error."""


def _pod_unreachable(exc: httpx.TransportError) -> ProblemError:
    return ProblemError(503, "Service Unavailable", "the session's pod is not reachable through the "
                        f"Kubernetes API yet ({type(exc).__name__}); retry shortly",
                        headers={"Retry-After": "2"})


def _why(response: httpx.Response) -> str:
    """The runner's own reason for a server error (the agent needs authentication, it failed...)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        return ""
    return f": {detail[:1000]}" if isinstance(detail, str) and detail else ""


class RunnerClient:
    def __init__(self, http: httpx.AsyncClient, *, forwarder: PortForwarder | None = None) -> None:
        self._http = http
        self._forwarder = forwarder

    def base_url(self, session: dict[str, Any]) -> str | None:
        status = session.get("status") or {}
        endpoint = status.get("endpoint")
        if not endpoint:
            return None
        if self._forwarder is None:
            return endpoint.rstrip("/")
        pod = status.get("podName")
        if not pod:
            return None
        return self._forwarder.local_url(session["metadata"]["namespace"], pod, urlsplit(endpoint).port or 80)

    def _failed(self, exc: httpx.HTTPError) -> Exception:
        # Through a port-forward the local listener always answers: a broken connection is the pod's side.
        if self._forwarder is not None and isinstance(exc, httpx.TransportError):
            return _pod_unreachable(exc)
        return RunnerUnavailable(f"the session's runner did not answer ({type(exc).__name__})")

    async def call(self, base_url: str, token: str, method: str, path: str,
                   json: Any = None) -> httpx.Response:
        try:
            response = await self._http.request(method, f"{base_url}{path}", json=json,
                                                headers={"Authorization": f"Bearer {token}"})
        except httpx.HTTPError as exc:
            raise self._failed(exc) from exc
        if response.status_code in (401, 403):
            # A 401/403 from the runner means our token is stale: the caller's fault it is not.
            raise RunnerUnavailable(f"the session's runner answered {response.status_code}")
        if response.status_code >= 500:
            raise RunnerUnavailable(f"the session's runner answered {response.status_code}{_why(response)}")
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
            raise self._failed(exc) from exc
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
