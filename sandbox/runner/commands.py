"""Which process speaks ACP for each runtime, and how the model choice and system prompt reach it."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentbox.sandbox.runner.settings import RunnerSettings

DEFAULT_COMMANDS: dict[str, list[str]] = {
    "claude-code": ["claude-agent-acp"],  # npm @zed-industries/claude-agent-acp
    "gemini": ["gemini", "--experimental-acp"],
    "codex": ["codex-acp"],  # npm @zed-industries/codex-acp
    "scripted": [sys.executable, "-m", "agentbox.sandbox.scripted_agent"],
}

# Variables the runner keeps to itself; everything else in its environment (API keys from the
# session's agent.env, PATH, HOME) is passed on to the agent.
PRIVATE_VARIABLES = ("AGENTBOX_RUNNER_TOKEN_FILE",)

# Linux caps one argument at 32 pages (MAX_ARG_STRLEN), its terminating NUL included.
MAX_ARGUMENT_BYTES = 32 * 4096


class CommandError(ValueError):
    pass


@dataclass(frozen=True)
class AgentLaunch:
    argv: list[str]
    env: dict[str, str]
    # Written before the agent starts, outside the workspace (the runner's private directory).
    files: dict[Path, str] = field(default_factory=dict)

    def write_files(self) -> None:
        for path, text in self.files.items():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            path.write_text(text)


def toml_string(text: str) -> str:
    # tomllib only reads TOML; a JSON string is a TOML basic string once DEL, which TOML forbids raw,
    # is escaped too.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def agent_command(settings: RunnerSettings, environ: Mapping[str, str], *, system_prompt: str = "",
                  private_dir: Path) -> AgentLaunch:
    """The agent's argv and environment. The system prompt goes wherever the runtime reads one that
    extends (never replaces) its own: claude-code and the scripted agent read ACP `_meta.systemPrompt`
    (the bridge sends it to every runtime); Gemini CLI a global GEMINI.md under GEMINI_CLI_HOME; Codex
    its `developer_instructions` config key."""
    if settings.agent_command:
        argv = list(settings.agent_command)
    elif settings.runtime == "custom":
        raise CommandError("AGENTBOX_AGENT_COMMAND: required for runtime custom (a JSON list)")
    else:
        argv = list(DEFAULT_COMMANDS[settings.runtime])
    env = {key: value for key, value in environ.items() if key not in PRIVATE_VARIABLES}
    files: dict[Path, str] = {}
    model = settings.agent_model
    if model:
        if settings.runtime == "claude-code":
            env["ANTHROPIC_MODEL"] = model
        elif settings.runtime == "gemini":
            argv += ["--model", model]
        elif settings.runtime == "codex":
            argv += ["-c", f"model={model}"]
        env["AGENTBOX_AGENT_MODEL"] = model
    if system_prompt:
        if settings.runtime == "gemini":
            # Gemini CLI appends its global context file to its own system instruction; GEMINI_CLI_HOME
            # moves that file (with Gemini's user-level state) to a directory only the runner writes.
            env["GEMINI_CLI_HOME"] = str(private_dir / "gemini")
            files[private_dir / "gemini" / ".gemini" / "GEMINI.md"] = system_prompt
        elif settings.runtime == "codex":
            # Codex sends developer_instructions as a developer message beside its built-in instructions.
            setting = f"developer_instructions={toml_string(system_prompt)}"
            if len(setting.encode()) >= MAX_ARGUMENT_BYTES:
                raise CommandError(f"AGENTBOX_SYSTEM_PROMPT_FILE: {len(system_prompt.encode())} bytes is "
                                   f"more than Codex can take on its command line ({MAX_ARGUMENT_BYTES} "
                                   "bytes per argument)")
            argv += ["-c", setting]
    return AgentLaunch(argv, env, files)
