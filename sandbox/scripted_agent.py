"""A deterministic ACP agent for tests and demos without a model: `python -m agentbox.sandbox.scripted_agent`.

Each prompt is one command; anything else is echoed back.
  write <path> <text>      write a file inside the session's working directory
  read <path>              answer with a file's text from the session's working directory
  tool <name> [json-args]  call an MCP tool through the session's first HTTP MCP server (the gateway)
  ask <title>              request permission from the client and report the outcome
  sleep <seconds>          wait, then answer (a cancel ends it early)
  error <text>             fail the turn with a JSON-RPC internal error whose data carries <text>
  hang                     never end the turn, whatever the client says (session/cancel included)
  crash                    say so on stderr and exit with code 3 in the middle of the turn
  system-prompt            answer with the system prompt the session was opened with

With AGENTBOX_SCRIPTED_REQUIRE_AUTH set (non-empty) it advertises one ACP auth method, `scripted-api-key`,
and refuses `session/new` with the auth-required error until the client authenticates with it; that
succeeds only when AGENTBOX_SCRIPTED_API_KEY is set, the way Gemini CLI's API-key method wants its key.

Failure modes, for the runner's tests (environment variables):
  AGENTBOX_SCRIPTED_EXIT_AT_START=<code>   write STARTUP_STDERR_LINES lines to stderr and exit at once
  AGENTBOX_SCRIPTED_REFUSE_PROMPTS=1       open sessions, then refuse every session/prompt with the
                                           auth-required error, as claude-agent-acp does without a key
  AGENTBOX_SCRIPTED_CHILD_PID_FILE=<path>  start a child that ignores SIGTERM and outlives this process
                                           unless killed (as codex-acp's launcher starts its binary);
                                           its pid goes to <path>
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from acp import (
    PROTOCOL_VERSION,
    Agent,
    AuthenticateResponse,
    Client,
    InitializeResponse,
    NewSessionResponse,
    PromptResponse,
    RequestError,
    run_agent,
    start_tool_call,
    text_block,
    tool_content,
    update_agent_message_text,
    update_tool_call,
)
from acp.schema import (
    AgentCapabilities,
    AuthEnvVar,
    EnvVarAuthMethod,
    HttpMcpServer,
    Implementation,
    PermissionOption,
    ToolCallUpdate,
)

STARTUP_STDERR_LINES = 25
# A child that only SIGKILL ends, holding the agent's stderr as a launched binary would.
STUBBORN_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(3600)"

AUTH_METHOD = EnvVarAuthMethod(type="env_var", id="scripted-api-key", name="Scripted API key",
                               vars=[AuthEnvVar(name="AGENTBOX_SCRIPTED_API_KEY")])


@dataclass
class ScriptedSession:
    cwd: Path
    gateway_url: str | None
    gateway_headers: dict[str, str]
    system_prompt: str
    cancelled: bool = False
    tool_calls: int = field(default=0)


def system_prompt_from(meta: dict[str, Any]) -> str:
    """Accepts the claude-agent-acp convention: `_meta.systemPrompt` is a string or {"append": text}."""
    value = meta.get("systemPrompt")
    if isinstance(value, dict):
        value = value.get("append")
    return value if isinstance(value, str) else ""


class ScriptedAgent(Agent):
    def __init__(self) -> None:
        self.sessions: dict[str, ScriptedSession] = {}
        self.client: Client | None = None
        self.requires_auth = bool(os.environ.get("AGENTBOX_SCRIPTED_REQUIRE_AUTH"))
        self.refuses_prompts = bool(os.environ.get("AGENTBOX_SCRIPTED_REFUSE_PROMPTS"))
        self.authenticated = False

    def on_connect(self, conn: Client) -> None:
        self.client = conn

    async def initialize(self, protocol_version: int, client_capabilities=None, client_info=None,
                         **kwargs: Any) -> InitializeResponse:
        return InitializeResponse(protocol_version=PROTOCOL_VERSION, agent_capabilities=AgentCapabilities(),
                                  agent_info=Implementation(name="agentbox-scripted", version="0.1.0"),
                                  auth_methods=[AUTH_METHOD] if self.requires_auth else [])

    async def authenticate(self, method_id: str, **kwargs: Any) -> AuthenticateResponse:
        if method_id != AUTH_METHOD.id:
            raise RequestError.invalid_params({"methodId": f"unknown auth method {method_id!r}"})
        if not os.environ.get("AGENTBOX_SCRIPTED_API_KEY"):
            raise RequestError.auth_required({"reason": "AGENTBOX_SCRIPTED_API_KEY is not set"})
        self.authenticated = True
        return AuthenticateResponse()

    async def new_session(self, cwd: str, additional_directories=None, mcp_servers=None,
                          **kwargs: Any) -> NewSessionResponse:
        if self.requires_auth and not self.authenticated:
            raise RequestError.auth_required({"authMethods": [AUTH_METHOD.id]})
        http = [server for server in mcp_servers or [] if isinstance(server, HttpMcpServer)]
        session_id = uuid.uuid4().hex
        self.sessions[session_id] = ScriptedSession(
            cwd=Path(await asyncio.to_thread(os.path.realpath, cwd)),
            gateway_url=http[0].url if http else None,
            gateway_headers={header.name: header.value for header in http[0].headers} if http else {},
            system_prompt=system_prompt_from(kwargs),
        )
        return NewSessionResponse(session_id=session_id)

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        if session_id in self.sessions:
            self.sessions[session_id].cancelled = True

    async def prompt(self, session_id: str, prompt: list, **kwargs: Any) -> PromptResponse:
        if self.refuses_prompts:
            raise RequestError(-32000, "Invalid API key · Please run /login", {"reason": "no credentials"})
        session = self.sessions[session_id]
        session.cancelled = False
        text = "".join(getattr(block, "text", "") for block in prompt).strip()
        command, _, rest = text.partition(" ")
        if command == "crash":
            await self.say(session_id, "crashing now")
            print("scripted agent: crashing on purpose", file=sys.stderr, flush=True)
            os._exit(3)
        if command == "hang":
            await asyncio.Event().wait()
        if command == "error":
            raise RequestError.internal_error({"details": rest})
        handler = {"write": self.write, "read": self.read, "tool": self.tool, "ask": self.ask,
                   "sleep": self.sleep, "system-prompt": self.show_system_prompt}.get(command)
        reply = await handler(session_id, session, rest.strip()) if handler else f"echo: {text}"
        if session.cancelled:
            return PromptResponse(stop_reason="cancelled")
        await self.say(session_id, reply)
        return PromptResponse(stop_reason="end_turn")

    async def say(self, session_id: str, text: str) -> None:
        assert self.client is not None
        await self.client.session_update(session_id, update_agent_message_text(text))

    async def write(self, session_id: str, session: ScriptedSession, rest: str) -> str:
        relative, _, content = rest.partition(" ")
        return await asyncio.to_thread(_write_inside, session.cwd, relative, content)

    async def read(self, session_id: str, session: ScriptedSession, rest: str) -> str:
        return await asyncio.to_thread(_read_inside, session.cwd, rest)

    async def tool(self, session_id: str, session: ScriptedSession, rest: str) -> str:
        name, _, raw_args = rest.partition(" ")
        if session.gateway_url is None:
            return "no MCP server in this session"
        try:
            arguments = json.loads(raw_args) if raw_args.strip() else {}
        except json.JSONDecodeError as error:
            return f"bad tool arguments: {error}"
        assert self.client is not None
        session.tool_calls += 1
        call_id = f"call-{session.tool_calls}"
        await self.client.session_update(session_id, start_tool_call(
            call_id, f"MCP {name}", kind="fetch", status="in_progress", raw_input=arguments))
        # Imported on first use: the MCP client stack is heavy and most scripted turns never need it.
        from fastmcp import Client as McpClient

        try:
            async with McpClient(session.gateway_url, auth=None) as mcp:
                mcp.transport.headers.update(session.gateway_headers)
                result = await mcp.call_tool(name, arguments, raise_on_error=False)
        except Exception as error:  # the agent reports a broken tool chain as its answer
            outcome, status = f"tool {name} failed: {error}", "failed"
        else:
            texts = [block.text for block in result.content if hasattr(block, "text")]
            outcome = ("tool error: " if result.is_error else "") + "\n".join(texts)
            status = "failed" if result.is_error else "completed"
        await self.client.session_update(session_id, update_tool_call(
            call_id, status=status, content=[tool_content(text_block(outcome))]))
        return outcome

    async def ask(self, session_id: str, session: ScriptedSession, rest: str) -> str:
        assert self.client is not None
        response = await self.client.request_permission(
            session_id,
            ToolCallUpdate(tool_call_id="ask-1", title=rest or "permission"),
            [PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
             PermissionOption(option_id="reject", name="Reject", kind="reject_once")],
        )
        outcome = response.outcome
        return f"permission: {getattr(outcome, 'option_id', None) or outcome.outcome}"

    async def sleep(self, session_id: str, session: ScriptedSession, rest: str) -> str:
        seconds = float(rest or "1")
        waited = 0.0
        while waited < seconds and not session.cancelled:
            step = min(0.05, seconds - waited)
            await asyncio.sleep(step)
            waited += step
        return f"slept {rest or '1'}"

    async def show_system_prompt(self, session_id: str, session: ScriptedSession, rest: str) -> str:
        return session.system_prompt or "(no system prompt)"


def _read_inside(root: Path, relative: str) -> str:
    target = (root / relative).resolve()
    if not relative or not target.is_relative_to(root):
        return f"refused: {relative!r} is outside the workspace"
    try:
        return target.read_text()
    except OSError as error:
        return f"cannot read {relative}: {error.strerror}"


def _write_inside(root: Path, relative: str, content: str) -> str:
    target = (root / relative).resolve()
    if not relative or not target.is_relative_to(root):
        return f"refused: {relative!r} is outside the workspace"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)
    return f"wrote {relative}"


def main() -> None:
    if code := os.environ.get("AGENTBOX_SCRIPTED_EXIT_AT_START"):
        for line in range(1, STARTUP_STDERR_LINES):
            print(f"scripted agent: startup line {line}", file=sys.stderr)
        print(f"scripted agent: fatal: exiting at start with code {code}", file=sys.stderr, flush=True)
        sys.exit(int(code))
    if pid_file := os.environ.get("AGENTBOX_SCRIPTED_CHILD_PID_FILE"):
        child = subprocess.Popen([sys.executable, "-c", STUBBORN_CHILD], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL)
        Path(pid_file).write_text(str(child.pid))
    asyncio.run(run_agent(ScriptedAgent()))


if __name__ == "__main__":
    main()
