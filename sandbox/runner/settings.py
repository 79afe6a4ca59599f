"""Runner settings from AGENTBOX_* environment variables (the operator renders them on the pod)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

Runtime = Literal["claude-code", "gemini", "codex", "scripted", "custom"]


class RunnerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTBOX_", extra="ignore")

    runtime: Runtime = "claude-code"
    runner_token_file: Path = Path("/var/run/agentbox/secrets/runner-token")
    system_prompt_file: Path = Path("/etc/agentbox/system-prompt.md")
    gateway_url: str = "http://127.0.0.1:8765/mcp"
    workspace: Path = Path("/workspace")
    # The conversation, kept on the workspace volume so it survives suspend/resume and pod restarts
    # (relative to the workspace, in a hidden folder of the platform's own). Empty: kept in memory only.
    conversation_file: str = ".agentbox/conversation.json"
    agent_model: str | None = None
    # JSON list, e.g. ["my-agent", "--acp"]: required for `custom`; overrides any other runtime's command.
    agent_command: list[str] | None = None
    # Loopback unless told otherwise: the image sets 0.0.0.0 so the session's Service can reach the runner.
    runner_host: str = "127.0.0.1"
    runner_port: int = Field(3284, ge=1, le=65535)
    upload_max_bytes: int = Field(25 * 1024 * 1024, ge=1)
    # The ACP auth method id to authenticate with (set through the session's agent.env); without it the
    # runner picks one by what the environment holds (auth.DEFAULT_AUTH_METHODS).
    agent_auth_method: str | None = None
    # How permission requests from the agent are answered: the pod is the sandbox, so allow by default.
    permission_policy: Literal["allow", "deny"] = "allow"
    agent_restart_max_seconds: float = Field(10.0, gt=0)
    # Failed starts in a row (an agent that cannot be run, fails the ACP handshake, or exits before it has
    # worked 30 s) before the runner gives up: it exits with EXIT_AGENT_FAILED and the session reads Failed.
    agent_restart_limit: int = Field(5, ge=1)
    # Stopping the agent: SIGTERM to its whole process group, SIGKILL to what is left after this long.
    agent_stop_grace_seconds: float = Field(5.0, gt=0)
    # A turn that runs longer is cancelled (ACP session/cancel), as a cancel from the caller is.
    turn_timeout_seconds: float = Field(3600.0, gt=0)
    # How long the agent has to end a cancelled turn before the runner ends it by restarting the agent.
    cancel_grace_seconds: float = Field(10.0, gt=0)
    # The runner's last word when it gives up (the container's terminationMessagePath, read by the operator).
    termination_message_file: Path | None = None
    # Where an auth refusal is remembered across the container's restarts (a file on the pod's /tmp
    # emptyDir): a restarted runner reports it at once instead of starting the agent to be refused again.
    needs_auth_file: Path | None = None
    # How long a runner that gave up keeps answering (/status, /events) before it exits with its verdict.
    exit_delay_seconds: float = Field(2.0, ge=0)
    # How long POST /message waits for a (re)starting agent before answering 503.
    agent_ready_wait_seconds: float = Field(10.0, ge=0)
