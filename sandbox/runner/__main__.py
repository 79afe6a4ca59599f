"""Entry point: `python -m agentbox.sandbox.runner` (settings from AGENTBOX_* variables)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

import uvicorn

from agentbox.sandbox.logs import configure_logging
from agentbox.sandbox.runner.auth import AuthPolicy
from agentbox.sandbox.runner.bridge import AgentBridge
from agentbox.sandbox.runner.commands import AgentLaunch, CommandError, agent_command
from agentbox.sandbox.runner.conversation import Conversation
from agentbox.sandbox.runner.settings import RunnerSettings

log = logging.getLogger("agentbox.runner")
# A pool member's runner token starts so (the operator's POOL_TOKEN_PREFIX): such a runner waits for the
# token its session's claim writes before it reads its system prompt and starts the agent.
POOL_TOKEN_PREFIX = "pool-"  # noqa: S105 (a prefix, not a token)
CLAIM_POLL_SECONDS = 0.2


def read_secret(path, what: str) -> str:
    try:
        value = path.read_text().strip()
    except OSError as error:
        raise SystemExit(f"{what} {path}: cannot read: {error.strerror}") from error
    if not value:
        raise SystemExit(f"{what} {path}: is empty")
    return value


def wait_for_claim(path: Path, token: str) -> str:
    """The session's token, once the pool member this runner belongs to has been claimed: the kubelet
    rewrites the mounted Secret after the claim (no event reaches a process for that, hence the poll)."""
    log.info("pool member: waiting for a session to claim this sandbox")
    while token.startswith(POOL_TOKEN_PREFIX):
        time.sleep(CLAIM_POLL_SECONDS)
        with contextlib.suppress(OSError):  # the kubelet swaps the file's directory under us
            token = path.read_text().strip() or token
    log.info("claimed by a session")
    return token


def exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    configure_logging()
    settings = RunnerSettings()
    token = read_secret(settings.runner_token_file, "AGENTBOX_RUNNER_TOKEN_FILE")
    signal.signal(signal.SIGTERM, exit_on_signal)
    token = wait_for_claim(settings.runner_token_file, token)
    try:
        system_prompt = settings.system_prompt_file.read_text()
    except FileNotFoundError:
        system_prompt = ""
        log.warning("no system prompt at %s", settings.system_prompt_file)
    # uvicorn re-raises the SIGTERM it caught once it has shut down; raised as an exception rather than
    # the default kill (set above, before the wait for a claim), the private directory below is removed
    # on the way out.
    # Files the agent reads besides its workspace (Gemini's context file); gone when the runner exits.
    with tempfile.TemporaryDirectory(prefix="agentbox-runner-") as private_dir:
        try:
            launch = agent_command(settings, os.environ, system_prompt=system_prompt,
                                   private_dir=Path(private_dir))
        except CommandError as error:
            sys.exit(str(error))
        launch.write_files()
        serve(settings, token, system_prompt, launch)


def serve(settings: RunnerSettings, token: str, system_prompt: str, launch: AgentLaunch) -> None:
    from agentbox.sandbox.runner.app import create_app  # after settings are known to be usable

    store = settings.workspace / settings.conversation_file if settings.conversation_file else None
    conversation = Conversation(settings.runtime, store)
    bridge = AgentBridge(conversation, argv=launch.argv, env=launch.env, settings=settings,
                         system_prompt=system_prompt,
                         auth_policy=AuthPolicy(settings.runtime, settings.agent_auth_method, launch.env))
    app = create_app(conversation, bridge, token=token, workspace=settings.workspace,
                     upload_max_bytes=settings.upload_max_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.runner_host, port=settings.runner_port,
                                           log_config=None, access_log=False))
    bridge.on_verdict = lambda verdict: setattr(server, "should_exit", True)
    server.run()
    if bridge.verdict is not None:
        # The runner gave up on its agent: the exit code and message are how the operator learns why.
        bridge.verdict.write(settings.termination_message_file)
        sys.exit(bridge.verdict.exit_code)


if __name__ == "__main__":
    main()
