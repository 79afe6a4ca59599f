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
    # How long POST /message waits for a (re)starting agent before answering 503.
    agent_ready_wait_seconds: float = Field(10.0, ge=0)
