"""ACP authentication: the method the runner picks per runtime and environment (pure), and the runner
with the scripted agent in its auth-requiring mode (real processes)."""

from __future__ import annotations

import asyncio
import json
import sys

import httpx
import pytest
from acp import RequestError
from acp.schema import AuthEnvVar, AuthMethodAgent, EnvVarAuthMethod

from agentbox.sandbox.runner.auth import AuthConfigError, AuthPolicy, is_auth_required

from .conftest import runner_process, sse_events, wait_until

GEMINI = ["oauth-personal", "gemini-api-key", "vertex-ai", "gateway"]
CODEX = ["api-key", "chat-gpt"]


@pytest.mark.parametrize(("runtime", "advertised", "environ", "chosen"), [
    ("gemini", GEMINI, {"GEMINI_API_KEY": "k"}, "gemini-api-key"),
    ("gemini", GEMINI, {"GEMINI_API_KEY": "k", "GOOGLE_API_KEY": "g"}, "gemini-api-key"),
    ("gemini", GEMINI, {"GOOGLE_CLOUD_PROJECT": "p", "GOOGLE_CLOUD_LOCATION": "us-central1"}, "vertex-ai"),
    ("gemini", GEMINI, {"GOOGLE_CLOUD_PROJECT": "p"}, None),  # Vertex AI needs its location too
    ("gemini", GEMINI, {"GOOGLE_API_KEY": "g"}, "vertex-ai"),
    ("gemini", GEMINI, {"GEMINI_API_KEY": ""}, None),  # an empty variable is no credential
    ("gemini", GEMINI, {}, None),  # never a login that wants a browser
    ("gemini", ["oauth-personal"], {"GEMINI_API_KEY": "k"}, None),  # only what the agent offers
    ("codex", CODEX, {"OPENAI_API_KEY": "o"}, "api-key"),
    ("codex", CODEX, {"CODEX_API_KEY": "c"}, "api-key"),
    ("codex", CODEX, {}, None),  # never chat-gpt, a browser login
    ("codex", ["chat-gpt"], {"OPENAI_API_KEY": "o"}, None),
    ("claude-code", ["claude-login"], {"ANTHROPIC_API_KEY": "a"}, None),  # it reads the key by itself
    ("custom", ["gemini-api-key"], {"GEMINI_API_KEY": "k"}, None),  # no defaults for an unknown agent
    ("scripted", ["scripted-api-key"], {"AGENTBOX_SCRIPTED_API_KEY": "s"}, "scripted-api-key"),
    ("gemini", [], {"GEMINI_API_KEY": "k"}, None),  # nothing advertised, nothing to authenticate
])
def test_the_default_method_follows_the_runtime_and_its_environment(runtime, advertised, environ, chosen):
    assert AuthPolicy(runtime, None, environ).choose(advertised) == chosen


def test_an_explicit_method_wins_and_must_be_one_the_agent_offers():
    policy = AuthPolicy("gemini", "oauth-personal", {"GEMINI_API_KEY": "k"})
    assert policy.choose(GEMINI) == "oauth-personal"
    assert policy.choose([]) is None
    with pytest.raises(AuthConfigError, match=r"AGENTBOX_AGENT_AUTH_METHOD: .*'oauth-personal'.*vertex-ai"):
        policy.choose(["gemini-api-key", "vertex-ai"])


def test_the_refusal_names_the_methods_and_what_to_set():
    advertised = [AuthMethodAgent(id="oauth-personal", name="Log in with Google"),
                  AuthMethodAgent(id="gemini-api-key", name="Use Gemini API key"),
                  EnvVarAuthMethod(type="env_var", id="vertex-ai", name="Vertex AI",
                                   vars=[AuthEnvVar(name="GOOGLE_API_KEY")])]
    message = AuthPolicy("gemini", None, {}).refusal(advertised, None, RequestError.auth_required())
    assert "no auth method was chosen (Authentication required [-32000])" in message
    assert "it advertises oauth-personal, gemini-api-key, vertex-ai" in message
    assert "set AGENTBOX_AGENT_AUTH_METHOD in the session's agent.env" in message
    assert "gemini-api-key reads GEMINI_API_KEY" in message
    assert "vertex-ai reads GOOGLE_API_KEY" in message, "what the agent declares beats the built-in hint"
    tried = AuthPolicy("gemini", None, {}).refusal(advertised, "gemini-api-key", RuntimeError("bad key"))
    assert "authenticate('gemini-api-key') failed (bad key)" in tried


def test_the_refusal_names_every_way_a_method_works():
    codex = AuthPolicy("codex", None, {}).refusal(
        [AuthMethodAgent(id=method, name=method) for method in CODEX], None, RequestError.auth_required())
    assert codex.endswith("; api-key reads CODEX_API_KEY or OPENAI_API_KEY")
    gemini = AuthPolicy("gemini", None, {}).refusal(
        [AuthMethodAgent(id=method, name=method) for method in GEMINI], None, RequestError.auth_required())
    assert ("; vertex-ai reads GOOGLE_CLOUD_PROJECT and GOOGLE_CLOUD_LOCATION or GOOGLE_API_KEY"
            in gemini)


def test_a_refused_prompt_names_the_variables_claude_code_reads_not_its_logins():
    refusal = RequestError(-32000, "Invalid API key", {"hint": "run /login"})
    message = AuthPolicy("claude-code", None, {}).refusal(
        [AuthMethodAgent(id="claude-login", name="Log in")], None, refusal, refused="session/prompt")
    assert message == ("the agent requires authentication: it refused session/prompt (Invalid API key "
                       '[-32000]: {"hint": "run /login"}); claude-code reads ANTHROPIC_API_KEY or '
                       "CLAUDE_CODE_OAUTH_TOKEN: store a provider key for the session (its "
                       "spec.egress.providerKey; the API's /api/v1/provider-keys)")


def test_only_the_auth_required_code_counts():
    assert is_auth_required(RequestError.auth_required())
    assert not is_auth_required(RequestError.internal_error())
    assert not is_auth_required(ValueError("x"))


# -- real processes ------------------------------------------------------------------------------------
# No gateway: the scripted agent only connects to one when a turn calls a tool.
def start_runner(runners: list, tmp_path, **env: str):
    # A refused runner exits after AGENTBOX_EXIT_DELAY_SECONDS (test_runner_failures); here it stays up.
    runner = runner_process(tmp_path, "http://127.0.0.1:9/mcp", AGENTBOX_SCRIPTED_REQUIRE_AUTH="1",
                            AGENTBOX_EXIT_DELAY_SECONDS="60", **env)
    runners.append(runner)  # stopped by the fixture even if it never gets ready
    runner.proc.start()
    wait_until(lambda: httpx.get(f"{runner.base}/healthz", timeout=1).json()["agent"] != "starting",
               what="runner and agent started")
    return runner


@pytest.fixture
def runners():
    started = []
    yield started
    for runner in started:
        runner.proc.stop()


@pytest.mark.parametrize("env", [
    {},  # the scripted runtime's default: its key is in the environment
    {"AGENTBOX_RUNTIME": "custom", "AGENTBOX_AGENT_AUTH_METHOD": "scripted-api-key",  # no default for custom
     "AGENTBOX_AGENT_COMMAND": json.dumps([sys.executable, "-m", "agentbox.sandbox.scripted_agent"])},
])
def test_the_runner_authenticates_before_the_session_opens(tmp_path, runners, env):
    runner = start_runner(runners, tmp_path, AGENTBOX_SCRIPTED_API_KEY="key", **env)
    assert httpx.get(f"{runner.base}/healthz").json()["agent"] == "ready"
    assert httpx.get(f"{runner.base}/readyz").status_code == 200
    with httpx.Client(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
        assert http.post("/message", json={"content": "hi"}).status_code == 200
        wait_until(lambda: http.get("/messages").json()["messages"][-1]["content"] == "echo: hi",
                   what="the agent's answer")


@pytest.mark.parametrize(("env", "says"), [
    ({}, "no auth method was chosen"),
    ({"AGENTBOX_AGENT_AUTH_METHOD": "scripted-api-key"}, "authenticate('scripted-api-key') failed"),
    ({"AGENTBOX_AGENT_AUTH_METHOD": "oauth"}, "AGENTBOX_AGENT_AUTH_METHOD: the agent does not offer 'oauth'"),
])
async def test_a_refusing_agent_is_reported_and_not_retried(tmp_path, runners, env, says):
    runner = start_runner(runners, tmp_path, **env)
    async with httpx.AsyncClient(base_url=runner.base, headers=runner.headers(), timeout=10) as http:
        assert (await http.get("/healthz")).json()["agent"] == "needs_auth"
        unready = await http.get("/readyz")
        assert unready.status_code == 503 and unready.json()["agent"] == "needs_auth"
        assert (await http.get("/status")).json()["status"] == "needs_auth"
        response = await http.post("/message", json={"content": "hi"})
        assert response.status_code == 503 and "retry-after" not in response.headers
        detail = response.json()["detail"]
        assert says in detail and "scripted-api-key" in detail
        if not env:
            assert "set AGENTBOX_AGENT_AUTH_METHOD" in detail
            assert "scripted-api-key reads AGENTBOX_SCRIPTED_API_KEY" in detail
        async with http.stream("GET", "/events") as stream:
            events = sse_events(stream)
            async for kind, data in events:
                if kind == "status_change":
                    assert data["status"] == "needs_auth"
                    break
            kind, data = await anext(events)
            assert (kind, data["message"]) == ("agent_error", detail), "the standing error opens the stream"
            # The agent restarts within a second after a crash (AGENTBOX_AGENT_RESTART_MAX_SECONDS=1);
            # a refusal is final, so nothing more comes.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(2.5):
                    kind, data = await anext(events)
                    pytest.fail(f"another event after the refusal: {kind} {data}")
    assert (await asyncio.to_thread(httpx.get, f"{runner.base}/healthz")).json()["agent"] == "needs_auth"
