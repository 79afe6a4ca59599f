"""Which process speaks ACP for each runtime, and how the model choice reaches it."""

from __future__ import annotations

import sys
from collections.abc import Mapping

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


class CommandError(ValueError):
    pass


def agent_command(settings: RunnerSettings, environ: Mapping[str, str]) -> tuple[list[str], dict[str, str]]:
    if settings.agent_command:
        argv = list(settings.agent_command)
    elif settings.runtime == "custom":
        raise CommandError("AGENTBOX_AGENT_COMMAND: required for runtime custom (a JSON list)")
    else:
        argv = list(DEFAULT_COMMANDS[settings.runtime])
    env = {key: value for key, value in environ.items() if key not in PRIVATE_VARIABLES}
    model = settings.agent_model
    if model:
        if settings.runtime == "claude-code":
            env["ANTHROPIC_MODEL"] = model
        elif settings.runtime == "gemini":
            argv += ["--model", model]
        elif settings.runtime == "codex":
            argv += ["-c", f"model={model}"]
        env["AGENTBOX_AGENT_MODEL"] = model
    return argv, env
