"""Drives the agent process over ACP: spawn, initialise, open the session, run turns, restart on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from acp import PROTOCOL_VERSION, Client, RequestError, spawn_agent_process, text_block
from acp.schema import (
    AgentMessageChunk,
    AllowedOutcome,
    ClientCapabilities,
    DeniedOutcome,
    FileSystemCapabilities,
    HttpMcpServer,
    Implementation,
    PermissionOption,
    ReadTextFileResponse,
    RequestPermissionResponse,
    ToolCallProgress,
    ToolCallStart,
    WriteTextFileResponse,
)

from agentbox.sandbox.runner.auth import AuthConfigError, AuthPolicy, is_auth_required
from agentbox.sandbox.runner.conversation import Conversation
from agentbox.sandbox.runner.workspace import WorkspaceError, confine

log = logging.getLogger("agentbox.runner")

HANDSHAKE_SECONDS = 60  # npx-style adapters can be slow on a cold start
CANCEL_KEYS = {"\x03", "\x1b"}  # Ctrl-C and Escape in a raw message cancel the running turn


class AgentBusy(Exception):
    pass


class AgentUnavailable(Exception):
    pass


class AgentNeedsAuth(AgentUnavailable):
    """The agent refuses to open a session without authentication: only new settings (a new pod) help."""


def choose_permission(policy: str, options: list[PermissionOption]) -> RequestPermissionResponse:
    """`allow` picks the narrowest allowing option, `deny` the narrowest rejecting one (else cancels)."""
    preferences = ("allow_once", "allow_always") if policy == "allow" else ("reject_once", "reject_always")
    for kind in preferences:
        for option in options:
            if option.kind == kind:
                return RequestPermissionResponse(outcome=AllowedOutcome(outcome="selected",
                                                                        option_id=option.option_id))
    return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))


class RunnerClient(Client):
    """The client side of ACP: what the agent may ask of the runner."""

    def __init__(self, bridge: AgentBridge) -> None:
        self.bridge = bridge

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.bridge.on_update(update)

    async def request_permission(self, session_id: str, tool_call: Any, options: list[PermissionOption],
                                 **kwargs: Any) -> RequestPermissionResponse:
        decision = choose_permission(self.bridge.permission_policy, options)
        log.info("permission %s for %r", decision.outcome.outcome, getattr(tool_call, "title", None))
        return decision

    async def read_text_file(self, session_id: str, path: str, line: int | None = None,
                             limit: int | None = None, **kwargs: Any) -> ReadTextFileResponse:
        target = self._inside(path)
        text = await asyncio.to_thread(Path.read_text, target)
        if line is not None or limit is not None:
            lines = text.splitlines(keepends=True)
            start = max((line or 1) - 1, 0)
            text = "".join(lines[start:start + limit] if limit is not None else lines[start:])
        return ReadTextFileResponse(content=text)

    async def write_text_file(self, session_id: str, path: str, content: str,
                              **kwargs: Any) -> WriteTextFileResponse:
        target = self._inside(path)
        await asyncio.to_thread(_write_text, target, content)
        return WriteTextFileResponse()

    def _inside(self, path: str) -> Path:
        try:
            return confine(self.bridge.workspace, path)
        except WorkspaceError as error:
            raise RequestError.invalid_params({"path": str(error)}) from error

    async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        raise RequestError.method_not_found(method)

    async def ext_notification(self, method: str, params: dict[str, Any]) -> None:
        return None


def _write_text(target: Path, content: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(content)


class AgentBridge:
    def __init__(self, conversation: Conversation, *, argv: list[str], env: dict[str, str], workspace: Path,
                 gateway_url: str, system_prompt: str, auth_policy: AuthPolicy,
                 permission_policy: str = "allow", restart_max_seconds: float = 10.0,
                 ready_wait_seconds: float = 10.0) -> None:
        self.conversation = conversation
        self.argv, self.env = argv, env
        self.workspace = workspace
        self.gateway_url = gateway_url
        self.system_prompt = system_prompt
        self.auth_policy = auth_policy
        self.permission_policy = permission_policy
        self.restart_max_seconds = restart_max_seconds
        self.ready_wait_seconds = ready_wait_seconds
        self.ready = asyncio.Event()
        self.restarts = 0
        self.needs_auth: str | None = None  # why the agent refused to open a session
        self._conn: Any = None
        self._session_id: str | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._turn: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="agent-supervisor")

    async def aclose(self) -> None:
        for task in (self._turn, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _supervise(self) -> None:
        backoff = 0.2
        while True:
            started = time.monotonic()
            try:
                exit_note = await self._run_agent_once()
            except AgentNeedsAuth as refusal:
                # Its settings come from the pod's environment, so asking again would be refused again.
                log.error("%s", refusal)
                self.needs_auth = str(refusal)
                self.conversation.agent_error(str(refusal), lasting=True)
                return
            self.restarts += 1
            if time.monotonic() - started > 30:
                backoff = 0.2  # it ran for a while: restart promptly
            self.conversation.agent_error(f"{exit_note}; restarting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.restart_max_seconds)

    async def _run_agent_once(self) -> str:
        try:
            async with spawn_agent_process(RunnerClient(self), *self.argv, env=self.env, cwd=self.workspace,
                                           transport_kwargs={"stderr": None}) as (conn, process):
                self._process = process
                async with asyncio.timeout(HANDSHAKE_SECONDS):
                    agent = await conn.initialize(
                        protocol_version=PROTOCOL_VERSION,
                        client_capabilities=ClientCapabilities(
                            fs=FileSystemCapabilities(read_text_file=True, write_text_file=True)),
                        client_info=Implementation(name="agentbox-runner", version="0.1.0"),
                    )
                    advertised = list(agent.auth_methods or [])
                    method = await self._authenticate(conn, advertised)
                    try:
                        session = await conn.new_session(
                            cwd=str(self.workspace),
                            mcp_servers=[HttpMcpServer(type="http", name="agentbox", url=self.gateway_url,
                                                       headers=[])],
                            # ACP has no system prompt field; adapters read _meta (claude-agent-acp's key).
                            # Gemini and Codex get theirs at launch instead (commands.agent_command).
                            systemPrompt={"append": self.system_prompt},
                        )
                    except RequestError as error:
                        if not is_auth_required(error):
                            raise
                        refusal = self.auth_policy.refusal(advertised, method, error)
                        raise AgentNeedsAuth(refusal) from error
                self._conn, self._session_id = conn, session.session_id
                self.ready.set()
                log.info("agent started: %s (pid %s)", self.argv[0], process.pid)
                code = await process.wait()
                return f"agent exited with code {code}"
        except AgentNeedsAuth:
            raise
        except TimeoutError:
            log.error("agent %s did not finish the ACP handshake in %ss", self.argv[0], HANDSHAKE_SECONDS)
            return f"agent did not answer initialize/new_session within {HANDSHAKE_SECONDS}s"
        except Exception as error:  # whatever the agent does wrong, the supervisor must live on to restart it
            log.exception("agent %s failed", self.argv[0])
            return f"agent failed: {error}"
        finally:
            self.ready.clear()
            self._conn = self._session_id = self._process = None

    async def _authenticate(self, conn: Any, advertised: list[Any]) -> str | None:
        """Authenticate with the method the policy picks from those advertised; the one used, or None."""
        try:
            method = self.auth_policy.choose([candidate.id for candidate in advertised])
        except AuthConfigError as error:
            raise AgentNeedsAuth(str(error)) from error
        if method is not None:
            try:
                await conn.authenticate(method_id=method)
            except RequestError as error:
                raise AgentNeedsAuth(self.auth_policy.refusal(advertised, method, error)) from error
            log.info("authenticated with %s", method)
        return method

    # -- turns -------------------------------------------------------------------------------------
    async def wait_ready(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                await self.ready.wait()
        except TimeoutError as error:
            if self.needs_auth is not None:  # refused while this message waited
                raise AgentNeedsAuth(self.needs_auth) from error
            raise AgentUnavailable("the agent is not running yet; retry shortly") from error

    async def send(self, content: str, kind: str) -> None:
        if kind == "raw" and content in CANCEL_KEYS:
            await self.cancel()
            return
        if self.conversation.status == "running":
            raise AgentBusy("the agent is running a turn; wait for status stable")
        if self.needs_auth is not None:
            raise AgentNeedsAuth(self.needs_auth)
        await self.wait_ready(self.ready_wait_seconds)
        if self.conversation.status == "running":  # another message won the race while we waited
            raise AgentBusy("the agent is running a turn; wait for status stable")
        self.conversation.set_status("running")
        if kind == "user":
            self.conversation.add_user_message(content)
        else:
            self.conversation.touch()
        self._turn = asyncio.create_task(self._run_turn(content), name="agent-turn")

    async def cancel(self) -> None:
        if self._conn is not None and self._session_id is not None and self.conversation.status == "running":
            await self._conn.cancel(session_id=self._session_id)

    async def _run_turn(self, content: str) -> None:
        conn, session_id, process = self._conn, self._session_id, self._process
        assert conn is not None and session_id is not None and process is not None
        prompt = asyncio.create_task(conn.prompt(session_id=session_id, prompt=[text_block(content)]))
        exited = asyncio.create_task(process.wait())
        try:
            await asyncio.wait({prompt, exited}, return_when=asyncio.FIRST_COMPLETED)
            if prompt.done() and prompt.exception() is None:
                log.info("turn ended: %s", prompt.result().stop_reason)
            else:
                # The connection may notice a dead agent before the process is reaped: give the exit a
                # moment, since an exit is reported once, by the supervisor, with its exit code.
                await asyncio.wait({exited}, timeout=0.5)
                if not exited.done():
                    self.conversation.agent_error(f"the turn failed: {prompt.exception()}")
        finally:
            for task in (prompt, exited):
                task.cancel()
            await asyncio.gather(prompt, exited, return_exceptions=True)
            self.conversation.touch()
            self.conversation.set_status("stable")

    def on_update(self, update: Any) -> None:
        if isinstance(update, AgentMessageChunk):
            text = getattr(update.content, "text", None)
            if text:
                self.conversation.append_agent_text(text)
        elif isinstance(update, ToolCallStart | ToolCallProgress):
            self.conversation.track_tool_call(update.tool_call_id, title=update.title, status=update.status)
        else:
            self.conversation.touch()
