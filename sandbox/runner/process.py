"""The agent's process: a process group of its own, its stderr kept in part, and stopped as a whole.

An ACP agent is often a launcher: codex-acp's npm package spawns a native binary, npx-style adapters a
node process. Started in a new session, the agent and whatever it starts share one process group, so
stopping the agent stops them all (SIGTERM to the group, SIGKILL to what is left after a grace).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections import deque
from collections.abc import Mapping
from pathlib import Path

STDERR_LINES = 20  # the agent's last stderr lines kept to say why it failed
STDERR_LINE_CHARS = 300
POLL_SECONDS = 0.05


class StderrTail:
    """The last lines of a byte stream, each cut to a bounded length."""

    def __init__(self, lines: int = STDERR_LINES, line_chars: int = STDERR_LINE_CHARS) -> None:
        self._lines: deque[str] = deque(maxlen=lines)
        self._line_chars = line_chars
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        *complete, self._partial = (self._partial + chunk).split(b"\n")
        for line in complete:
            self._keep(line)
        if len(self._partial) > 4 * self._line_chars:  # a line without end: keep its start, drop the rest
            self._keep(self._partial)
            self._partial = b""

    def _keep(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        if text:
            self._lines.append(text[:self._line_chars])

    def lines(self) -> list[str]:
        pending = self._partial.decode(errors="replace").rstrip()[:self._line_chars]
        lines = [*self._lines, pending] if pending else list(self._lines)
        return lines[-(self._lines.maxlen or 0):]


class AgentProcess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.stderr = StderrTail()
        self._copying = asyncio.create_task(self._copy_stderr(), name="agent-stderr")

    @classmethod
    async def spawn(cls, argv: list[str], env: Mapping[str, str], cwd: Path) -> AgentProcess:
        """Raises OSError when the command cannot be run (not found, not executable)."""
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env=dict(env), cwd=cwd, start_new_session=True)
        return cls(process)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def wait(self) -> int:
        return await self.process.wait()

    async def exit_code_within(self, seconds: float) -> int | None:
        """The exit code if the agent exits within `seconds` (it often is on its way out already)."""
        try:
            return await asyncio.wait_for(asyncio.shield(self.process.wait()), seconds)
        except TimeoutError:
            return None

    async def _copy_stderr(self) -> None:
        """The agent's stderr goes on to the runner's (the container's log) and its tail is kept."""
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(65536):
            self.stderr.feed(chunk)
            sys.stderr.buffer.write(chunk)
            sys.stderr.buffer.flush()

    async def stop(self, grace: float) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL to whatever is left after `grace`."""
        if self.process.stdin is not None:
            self.process.stdin.close()
        self._signal_group(signal.SIGTERM)
        if not await self._group_gone_within(grace):
            self._signal_group(signal.SIGKILL)
            await self._group_gone_within(grace)
        await self.process.wait()
        # Everything that held the pipe is gone: what it wrote last is read to the end.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._copying, grace)
        self._copying.cancel()

    def _signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signum)

    async def _group_gone_within(self, seconds: float) -> bool:
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            if self.process.returncode is not None:
                self._reap_group()
            try:
                os.killpg(self.process.pid, 0)
            except ProcessLookupError:
                return True
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(POLL_SECONDS)

    def _reap_group(self) -> None:
        """As a container's PID 1 the runner inherits the group's orphans: reap those that exited, or
        they would linger as zombies (and keep the group alive). Only once the agent itself is reaped, so
        asyncio's own wait for it is never robbed."""
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-self.process.pid, os.WNOHANG)[0]:
                pass
