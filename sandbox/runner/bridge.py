"""Drives the agent process over ACP: spawn, initialise, open the session, run turns, restart on exit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from acp import PROTOCOL_VERSION, Client, RequestError, connect_to_agent, text_block
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
from agentbox.sandbox.runner.conversation import Conversation, Status
from agentbox.sandbox.runner.failures import (
    EXIT_AGENT_FAILED,
    EXIT_NEEDS_AUTH,
    TERMINATION_STDERR_LINES,
    AgentFailure,
    Verdict,
    describe_error,
)
from agentbox.sandbox.runner.process import AgentProcess
from agentbox.sandbox.runner.settings import RunnerSettings
from agentbox.sandbox.runner.workspace import WorkspaceError, confine

log = logging.getLogger("agentbox.runner")

HANDSHAKE_SECONDS = 60  # npx-style adapters can be slow on a cold start
CANCEL_KEYS = {"\x03", "\x1b"}  # Ctrl-C and Escape in a raw message cancel the running turn
# An agent that worked this long before it exited had started: its count of failed starts begins again.
STABLE_SECONDS = 30
FIRST_BACKOFF_SECONDS = 0.2
# A broken connection is often an agent on its way out: how long to wait for its exit code.
EXIT_NOTICE_SECONDS = 1.0

# The agent as the probes and /status see it: `starting` covers restarts; `needs_auth` and `failed` are
# final for this pod (the runner exits with its verdict, and a restarted runner remembers a refusal).
AgentState = Literal["starting", "ready", "needs_auth", "failed"]


class AgentBusy(Exception):
    pass


class AgentUnavailable(Exception):
    pass


class AgentNeedsAuth(AgentUnavailable):
    """The agent refuses to work without authentication: only new settings (a new pod) help."""


class AgentFailed(AgentUnavailable):
    """The runner gave up on the agent after too many failed starts."""


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
    def __init__(self, conversation: Conversation, *, argv: list[str], env: dict[str, str],
                 settings: RunnerSettings, system_prompt: str, auth_policy: AuthPolicy,
                 on_verdict: Callable[[Verdict], None] = lambda verdict: None) -> None:
        self.conversation = conversation
        self.argv, self.env = argv, env
        self.settings = settings
        self.workspace = settings.workspace
        self.permission_policy = settings.permission_policy
        self.system_prompt = system_prompt
        self.auth_policy = auth_policy
        self.on_verdict = on_verdict  # called once the runner gives up, after settings.exit_delay_seconds
        self.state: AgentState = "starting"
        self.detail: str | None = None  # why the agent is not ready, when there is more to say
        self.last_failure: AgentFailure | None = None  # kept once the agent runs again: /status shows it
        self.verdict: Verdict | None = None
        self.restarts = 0
        self._state_changed = asyncio.Event()
        self._restart = asyncio.Event()  # the runner ends the agent on purpose (a turn that would not end)
        self._cancel = asyncio.Event()  # the caller (or the turn time limit) cancels the running turn
        self._conn: Any = None
        self._session_id: str | None = None
        self._agent: AgentProcess | None = None
        self._ready_at: float | None = None  # when the running agent opened its session
        self._advertised: list[Any] = []
        self._auth_method: str | None = None
        self._turn: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._exit: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="agent-supervisor")

    async def aclose(self) -> None:
        """Ends the turn, then the agent's whole process group (the supervisor stops it on its way out)."""
        for task in (self._turn, self._exit, self._supervisor):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _set_state(self, state: AgentState, detail: str | None = None) -> None:
        self.state, self.detail = state, detail
        self._state_changed.set()  # wakes whoever waits for the agent; they wait on the next one
        self._state_changed = asyncio.Event()
        if self.conversation.status != "running":
            self.conversation.set_status(self._idle_status())

    def _idle_status(self) -> Status:
        return self.state if self.state in ("needs_auth", "failed") else "stable"

    async def _supervise(self) -> None:
        remembered = await asyncio.to_thread(_read_if_any, self.settings.needs_auth_file)
        if remembered:  # refused before this container restarted: the same settings would be refused again
            log.error("%s (refused before the runner restarted)", remembered)
            self._report_needs_auth(remembered)
            return
        failures, backoff = 0, FIRST_BACKOFF_SECONDS
        while True:
            self._ready_at = None
            try:
                failure = await self._run_agent_once()
            except AgentNeedsAuth as refusal:
                await self._refuse(str(refusal))
                return
            if self.verdict is not None:  # refused during a turn: the runner is on its way out
                return
            self.restarts += 1
            if failure is None:  # restarted on purpose: no failure, no wait
                continue
            self.last_failure = failure
            log.error("%s", failure.describe())
            if self._ready_at is not None and time.monotonic() - self._ready_at > STABLE_SECONDS:
                failures, backoff = 0, FIRST_BACKOFF_SECONDS  # it worked for a while: restart promptly
            failures += 1
            if failures >= self.settings.agent_restart_limit:
                self._fail(f"gave up after {failures} failed starts in a row: "
                           f"{failure.describe(TERMINATION_STDERR_LINES)}")
                return
            self._set_state("starting", failure.summary())
            self.conversation.agent_error(f"{failure.describe()}; restarting in {backoff:.1f}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.settings.agent_restart_max_seconds)

    async def _run_agent_once(self) -> AgentFailure | None:
        """Run the agent until it exits: how it went, or None if the runner ended it on purpose."""
        try:
            agent = await AgentProcess.spawn(self.argv, self.env, self.workspace)
        except OSError as error:
            return AgentFailure(self.argv[0], f"cannot be started: {error.strerror or error}")
        assert agent.process.stdin is not None and agent.process.stdout is not None
        conn = connect_to_agent(RunnerClient(self), agent.process.stdin, agent.process.stdout)
        try:
            outcome = await self._drive(conn, agent)
        finally:
            self._conn = self._session_id = self._agent = None
            self._restart.clear()
            if self.state == "ready":
                self._set_state("starting")
            with contextlib.suppress(Exception):  # the agent may be gone already
                await conn.close()
            await agent.stop(self.settings.agent_stop_grace_seconds)
        if outcome is None:
            return None
        what, exit_code = outcome
        # Read after the stop: by then the agent's stderr has been read to its end.
        return AgentFailure(self.argv[0], what, exit_code, agent.stderr.lines())

    async def _drive(self, conn: Any, agent: AgentProcess) -> tuple[str, int | None] | None:
        """Open the session and wait for the agent to exit: what happened and its exit code, or None."""
        try:
            async with asyncio.timeout(HANDSHAKE_SECONDS):
                session_id = await self._open_session(conn)
        except AgentNeedsAuth:
            raise
        except TimeoutError:
            return f"did not finish the ACP handshake within {HANDSHAKE_SECONDS}s", None
        except Exception as error:  # whatever the agent does wrong, the supervisor must live on to restart it
            code = await agent.exit_code_within(EXIT_NOTICE_SECONDS)
            if code is not None:
                return f"exited with code {code} during the ACP handshake", code
            log.exception("agent %s failed the ACP handshake", self.argv[0])
            return f"failed the ACP handshake: {describe_error(error)}", None
        self._conn, self._session_id, self._agent = conn, session_id, agent
        self._ready_at = time.monotonic()
        self._set_state("ready")
        log.info("agent started: %s (pid %s)", self.argv[0], agent.pid)
        exited = asyncio.create_task(agent.wait())
        restart = asyncio.create_task(self._restart.wait())
        try:
            await asyncio.wait({exited, restart}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (exited, restart):
                task.cancel()
        if not exited.done() or exited.cancelled():
            return None
        return f"exited with code {exited.result()}", exited.result()

    async def _open_session(self, conn: Any) -> str:
        agent = await conn.initialize(
            protocol_version=PROTOCOL_VERSION,
            client_capabilities=ClientCapabilities(
                fs=FileSystemCapabilities(read_text_file=True, write_text_file=True)),
            client_info=Implementation(name="agentbox-runner", version="0.1.0"),
        )
        self._advertised = list(agent.auth_methods or [])
        self._auth_method = await self._authenticate(conn, self._advertised)
        try:
            session = await conn.new_session(
                cwd=str(self.workspace),
                mcp_servers=[HttpMcpServer(type="http", name="agentbox", url=self.settings.gateway_url,
                                           headers=[])],
                # ACP has no system prompt field; adapters read _meta (claude-agent-acp's key).
                # Gemini and Codex get theirs at launch instead (commands.agent_command).
                systemPrompt={"append": self.system_prompt},
            )
        except RequestError as error:
            if not is_auth_required(error):
                raise
            refusal = self.auth_policy.refusal(self._advertised, self._auth_method, error)
            raise AgentNeedsAuth(refusal) from error
        return session.session_id

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

    # -- giving up ---------------------------------------------------------------------------------
    def _report_needs_auth(self, refusal: str) -> None:
        self._set_state("needs_auth", refusal)
        self.conversation.agent_error(refusal, lasting=True)

    async def _refuse(self, refusal: str) -> None:
        """The agent will not work without credentials the pod does not give it: remember that for a
        restarted runner, and give up (the session turns NeedsAuth)."""
        log.error("%s", refusal)
        self._report_needs_auth(refusal)
        remembered = self.settings.needs_auth_file
        if remembered is not None:
            try:
                await asyncio.to_thread(remembered.write_text, refusal)
            except OSError as error:  # a restarted runner meets the refusal again: slower, no worse
                log.error("cannot remember the refusal in %s: %s", remembered, error.strerror)
        self._give_up(Verdict(EXIT_NEEDS_AUTH, refusal))

    def _fail(self, message: str) -> None:
        """The agent keeps failing to start: give up (the session turns Failed)."""
        log.error("%s", message)
        self._set_state("failed", message)
        self.conversation.agent_error(message, lasting=True)
        self._give_up(Verdict(EXIT_AGENT_FAILED, message))

    def _give_up(self, verdict: Verdict) -> None:
        self.verdict = verdict
        self._exit = asyncio.create_task(self._exit_later(verdict), name="runner-exit")

    async def _exit_later(self, verdict: Verdict) -> None:
        # Callers polling /status and streaming /events get to see why before the runner goes.
        await asyncio.sleep(self.settings.exit_delay_seconds)
        self.on_verdict(verdict)

    # -- turns -------------------------------------------------------------------------------------
    def _raise_if_given_up(self) -> None:
        if self.state == "needs_auth":
            raise AgentNeedsAuth(self.detail or "the agent requires authentication")
        if self.state == "failed":
            raise AgentFailed(self.detail or "the agent failed")

    async def wait_ready(self, seconds: float) -> None:
        try:
            async with asyncio.timeout(seconds):
                while self.state != "ready":
                    self._raise_if_given_up()
                    await self._state_changed.wait()
        except TimeoutError as error:
            why = f" (it {self.last_failure.what})" if self.last_failure else ""
            raise AgentUnavailable(f"the agent is not running yet{why}; retry shortly") from error

    async def send(self, content: str, kind: str) -> None:
        if kind == "raw" and content in CANCEL_KEYS:
            self.cancel()
            return
        if self.conversation.status == "running":
            raise AgentBusy("the agent is running a turn; wait for status stable")
        self._raise_if_given_up()
        await self.wait_ready(self.settings.agent_ready_wait_seconds)
        if self.conversation.status == "running":  # another message won the race while we waited
            raise AgentBusy("the agent is running a turn; wait for status stable")
        self.conversation.set_status("running")
        if kind == "user":
            self.conversation.add_user_message(content)
        else:
            self.conversation.touch()
        self._turn = asyncio.create_task(self._run_turn(content), name="agent-turn")

    def cancel(self) -> None:
        """End the running turn: ACP session/cancel, and the agent restarted if it does not end the turn
        within settings.cancel_grace_seconds."""
        if self.conversation.status == "running":
            self._cancel.set()

    async def _run_turn(self, content: str) -> None:
        conn, session_id, agent = self._conn, self._session_id, self._agent
        assert conn is not None and session_id is not None and agent is not None
        prompt = asyncio.create_task(conn.prompt(session_id=session_id, prompt=[text_block(content)]))
        exited = asyncio.create_task(agent.wait())
        cancelled = asyncio.create_task(self._cancel.wait())
        limit = self.settings.turn_timeout_seconds
        try:
            done, _ = await asyncio.wait({prompt, exited, cancelled}, timeout=limit,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not (prompt.done() or exited.done()):
                if not done:
                    self.conversation.agent_error(f"the turn ran past its {limit:g}s limit; cancelling it")
                if not await self._end_turn(conn, session_id, prompt, exited):
                    return
            await self._report_turn(prompt, exited)
        finally:
            for task in (prompt, exited, cancelled):
                task.cancel()
            await asyncio.gather(prompt, exited, cancelled, return_exceptions=True)
            self._cancel.clear()
            self.conversation.touch()
            self.conversation.set_status(self._idle_status())

    async def _end_turn(self, conn: Any, session_id: str, prompt: asyncio.Task[Any],
                        exited: asyncio.Task[int]) -> bool:
        """session/cancel, then the agent has the grace to end the turn; True if it did. If not, the turn
        ends here and the agent is restarted (a turn it never ends would block the session for good)."""
        grace = self.settings.cancel_grace_seconds
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                with contextlib.suppress(Exception):  # an agent that cannot take it is restarted below
                    await conn.cancel(session_id=session_id)
                await asyncio.wait({prompt, exited}, return_when=asyncio.FIRST_COMPLETED)
        if prompt.done() or exited.done():
            return True
        self.conversation.agent_error(f"the agent did not end the turn within {grace:g}s of session/cancel; "
                                      "restarting it")
        self._restart.set()
        return False

    async def _report_turn(self, prompt: asyncio.Task[Any], exited: asyncio.Task[int]) -> None:
        if prompt.done() and prompt.exception() is None:
            log.info("turn ended: %s", prompt.result().stop_reason)
            return
        # The connection may notice a dead agent before the process is reaped: give the exit a moment,
        # since an exit is reported once, by the supervisor, with its exit code and stderr.
        await asyncio.wait({exited}, timeout=EXIT_NOTICE_SECONDS)
        if exited.done() or not prompt.done():
            return
        error = prompt.exception()
        if is_auth_required(error):  # claude-agent-acp opens sessions freely and refuses the first prompt
            await self._refuse(self.auth_policy.refusal(self._advertised, self._auth_method, error,
                                                        refused="session/prompt"))
            return
        self.conversation.agent_error(f"the turn failed: {describe_error(error)}")

    def on_update(self, update: Any) -> None:
        if isinstance(update, AgentMessageChunk):
            text = getattr(update.content, "text", None)
            if text:
                self.conversation.append_agent_text(text)
        elif isinstance(update, ToolCallStart | ToolCallProgress):
            self.conversation.track_tool_call(update.tool_call_id, title=update.title, status=update.status)
        else:
            self.conversation.touch()


def _read_if_any(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None
