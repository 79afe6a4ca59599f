"""Why the agent stopped or will not work, and how the runner says so when it gives up.

The runner has no Kubernetes credentials. What reaches the session's status goes through the container:
the runner writes a short message to its termination message file and exits with one of the codes
below. The operator reads both from the pod's container status (agentbox.operator.status) and turns
the session NeedsAuth or Failed with that message; the codes are repeated there (sandbox and operator
share no code).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agentbox.sandbox.runner.conversation import now, rfc3339

log = logging.getLogger("agentbox.runner")

EXIT_AGENT_FAILED = os.EX_UNAVAILABLE  # 69: the agent failed to start agent_restart_limit times in a row
EXIT_NEEDS_AUTH = os.EX_NOPERM  # 77: the agent refused for lack of authentication
ERROR_DATA_CHARS = 500
# The kubelet keeps at most 4096 bytes of a termination message; the start of ours says the most.
TERMINATION_MESSAGE_BYTES = 4000
TERMINATION_STDERR_LINES = 8


def describe_error(error: BaseException) -> str:
    """An error as the agent sent it: a JSON-RPC error keeps its code and data (where agents say why)."""
    text = str(error) or type(error).__name__
    code = getattr(error, "code", None)
    if code is not None:
        text += f" [{code}]"
    data = getattr(error, "data", None)
    if data:
        text += f": {json.dumps(data, default=str)[:ERROR_DATA_CHARS]}"
    return text


@dataclass(frozen=True)
class AgentFailure:
    """One way the agent went: the command, what happened, its exit code if it exited, its last stderr."""

    command: str
    what: str  # "exited with code 3", "cannot be started: No such file or directory", ...
    exit_code: int | None = None
    stderr: list[str] = field(default_factory=list)
    time: datetime = field(default_factory=now)

    def summary(self) -> str:
        return f"agent {self.command} {self.what}"

    def describe(self, stderr_lines: int | None = None) -> str:
        lines = self.stderr[-stderr_lines:] if stderr_lines else self.stderr
        return self.summary() + (f"; its last stderr: {' | '.join(lines)}" if lines else "")

    def as_json(self) -> dict[str, Any]:
        return {"command": self.command, "message": self.summary(), "exit_code": self.exit_code,
                "stderr": self.stderr, "time": rfc3339(self.time)}


@dataclass(frozen=True)
class Verdict:
    """The runner gives up: the exit code that says why, and the message that goes with it."""

    exit_code: int
    message: str

    def write(self, path: Path | None) -> None:
        """The container's termination message (the kubelet reads it once the runner has exited)."""
        if path is None:
            return
        data = self.message.encode()[:TERMINATION_MESSAGE_BYTES].decode(errors="ignore")
        try:
            path.write_text(data)
        except OSError as error:  # the exit code still tells the operator which way it went
            log.error("cannot write the termination message to %s: %s", path, error.strerror)
