"""One pending wake-up per object, replacing kopf timers: a kopf timer puts a finalizer on every object it
runs for, so a namespace deleted while the operator is down would hang in Terminating."""

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

log = logging.getLogger(__name__)


class Later:
    def __init__(self, about: Callable[[Hashable], dict[str, Any]] | None = None) -> None:
        """`about(key)`: the extra fields of a log line about the key's object."""
        self._handles: dict[Hashable, asyncio.TimerHandle] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._about = about

    def schedule(self, key: Hashable, delay: float, wake: Callable[[], Awaitable[None]]) -> None:
        """Run `wake()` in `delay` seconds, replacing whatever was pending for `key`."""
        self.cancel(key)
        self._handles[key] = asyncio.get_running_loop().call_later(max(0.0, delay), self._fire, key, wake)

    def cancel(self, key: Hashable) -> None:
        handle = self._handles.pop(key, None)
        if handle is not None:
            handle.cancel()

    def pending(self, key: Hashable) -> bool:
        return key in self._handles

    def _fire(self, key: Hashable, wake: Callable[[], Awaitable[None]]) -> None:
        self._handles.pop(key, None)
        task = asyncio.create_task(self._run(key, wake))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, key: Hashable, wake: Callable[[], Awaitable[None]]) -> None:
        try:
            await wake()
        except Exception:  # the wake-up's own retry policy lives in `wake`; nothing may kill the loop
            about = self._about(key) if self._about else None
            log.exception("scheduled work for %s failed", key, extra=about)
