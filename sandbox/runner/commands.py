"""Which process speaks ACP for each runtime, and how the model choice and system prompt reach it."""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from agentbox.sandbox.runner.settings import RunnerSettings

# The npm packages and versions behind these commands are pinned in sandbox/images/agents.json.
DEFAULT_COMMANDS: dict[str, list[str]] = {
    "claude-code": ["claude-agent-acp"],  # @agentclientprotocol/claude-agent-acp
    "gemini": ["gemini", "--acp"],  # @google/gemini-cli (--experimental-acp is its deprecated alias)
    "codex": ["codex-acp"],  # @agentclientprotocol/codex-acp
    "scripted": [sys.executable, "-m", "agentbox.sandbox.scripted_agent"],
}

# codex-acp reads its Codex configuration overrides as one JSON object from this variable (no flags).
CODEX_CONFIG_VARIABLE = "CODEX_CONFIG"

# Variables the runner keeps to itself; everything else in its environment (API keys from the
# session's agent.env, PATH, HOME) is passed on to the agent.
PRIVATE_VARIABLES = ("AGENTBOX_RUNNER_TOKEN_FILE",)

# Linux caps one argument or environment string at 32 pages (MAX_ARG_STRLEN), its terminating NUL included.
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


def codex_config(environ: Mapping[str, str], model: str | None, system_prompt: str) -> str:
    """CODEX_CONFIG with the model and the system prompt added to what the session's agent.env set."""
    given = environ.get(CODEX_CONFIG_VARIABLE)
    try:
        config = json.loads(given) if given else {}
    except json.JSONDecodeError as error:
        raise CommandError(f"{CODEX_CONFIG_VARIABLE}: not JSON ({error})") from error
    if not isinstance(config, dict):
        raise CommandError(f"{CODEX_CONFIG_VARIABLE}: must be a JSON object of Codex settings")
    if model:
        config["model"] = model
    if system_prompt:
        # Codex sends developer_instructions as a developer message beside its built-in instructions.
        own = config.get("developer_instructions")
        config["developer_instructions"] = f"{own}\n\n{system_prompt}" if own else system_prompt
    text = json.dumps(config, ensure_ascii=False)
    if len(f"{CODEX_CONFIG_VARIABLE}={text}".encode()) >= MAX_ARGUMENT_BYTES:
        raise CommandError(f"AGENTBOX_SYSTEM_PROMPT_FILE: {len(system_prompt.encode())} bytes is more than "
                           f"Codex can take in {CODEX_CONFIG_VARIABLE} ({MAX_ARGUMENT_BYTES} bytes per "
                           "environment variable)")
    return text


def agent_command(settings: RunnerSettings, environ: Mapping[str, str], *, system_prompt: str = "",
                  private_dir: Path) -> AgentLaunch:
    """The agent's argv and environment. The system prompt goes wherever the runtime reads one that
    extends (never replaces) its own: claude-code and the scripted agent read ACP `_meta.systemPrompt`
    (the bridge sends it to every runtime); Gemini CLI a global GEMINI.md under GEMINI_CLI_HOME; Codex
    its `developer_instructions` setting in CODEX_CONFIG."""
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
        env["AGENTBOX_AGENT_MODEL"] = model
    if system_prompt:
        if settings.runtime == "gemini":
            # Gemini CLI appends its global context file to its own system instruction; GEMINI_CLI_HOME
            # moves that file (with Gemini's user-level state) to a directory only the runner writes.
            env["GEMINI_CLI_HOME"] = str(private_dir / "gemini")
            files[private_dir / "gemini" / ".gemini" / "GEMINI.md"] = system_prompt
    if settings.runtime == "codex" and (model or system_prompt):
        env[CODEX_CONFIG_VARIABLE] = codex_config(environ, model, system_prompt)
    return AgentLaunch(argv, env, files)
