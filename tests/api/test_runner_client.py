"""How the API reads a runner's answers (the runner itself is tested in tests/sandbox)."""

import httpx
import pytest

from agentbox.api.runner_client import RunnerClient, RunnerUnavailable

NEEDS_AUTH = "the agent requires authentication: it refused session/prompt (Invalid API key [-32000])"


@pytest.mark.parametrize(("status", "body", "says"), [
    (503, {"detail": NEEDS_AUTH, "status": 503}, f"the session's runner answered 503: {NEEDS_AUTH}"),
    (502, "<html>bad gateway</html>", "the session's runner answered 502"),
    (401, {"detail": "a valid runner token is required"}, "the session's runner answered 401"),
])
async def test_a_runner_s_refusal_keeps_its_reason(status, body, says):
    def answer(request: httpx.Request) -> httpx.Response:
        return (httpx.Response(status, json=body) if isinstance(body, dict)
                else httpx.Response(status, text=body))

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        with pytest.raises(RunnerUnavailable) as refused:
            await RunnerClient(http).call("http://runner:3284", "token", "POST", "/message", json={})
    assert str(refused.value) == says
