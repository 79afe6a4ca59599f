"""The agentapi view of a session: messages, status, last activity, and the event fan-out to SSE clients.

With a store (a file on the workspace volume) the messages outlive the pod: a session suspended and
resumed, or a pod that restarts, shows its earlier conversation again."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Role = Literal["user", "agent"]
# agentapi's two (a turn runs, or the agent waits for a message), and the two ways it cannot take one.
Status = Literal["stable", "running", "needs_auth", "failed"]
SUBSCRIBER_QUEUE = 1000
log = logging.getLogger("agentbox.runner.conversation")


def now() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment else None


@dataclass
class Message:
    id: int
    role: Role
    content: str
    time: datetime
    tool_calls: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "role": self.role, "content": self.content,
                                "time": rfc3339(self.time)}
        if self.tool_calls:
            body["tool_calls"] = list(self.tool_calls.values())
        return body

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Message:
        calls = {call["id"]: call for call in body.get("tool_calls") or []}
        return cls(int(body["id"]), body["role"], body["content"], datetime.fromisoformat(body["time"]),
                   calls)


def read_store(store: Path) -> list[Message]:
    """The messages kept in `store`; none when it is missing or unreadable (said in the log)."""
    try:
        body = json.loads(store.read_text())
        return [Message.from_json(message) for message in body["messages"]]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("conversation store %s unreadable, starting afresh: %s", store, error)
        return []


def write_store(store: Path, text: str) -> None:
    """Replace the store whole (a temporary file renamed over it: a pod killed mid-write loses nothing)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    partial = store.with_name(f".{store.name}.partial")
    partial.write_text(text)
    os.replace(partial, store)


@dataclass
class Event:
    kind: str  # message_update | status_change | agent_error
    data: dict[str, Any]


class Conversation:
    def __init__(self, agent_type: str, store: Path | None = None) -> None:
        self.agent_type = agent_type
        self.store = store
        self.messages: list[Message] = read_store(store) if store is not None else []
        self._saving: asyncio.Task[None] | None = None
        self._unsaved = False
        self.status: Status = "stable"
        self.last_activity: datetime | None = None
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._reply: Message | None = None  # the agent message of the running turn
        self._lasting_error: Event | None = None  # an error that stays true, told to every new subscriber

    def touch(self) -> None:
        self.last_activity = now()

    def _save_soon(self) -> None:
        """Write the store off the event loop: one write at a time, the last state always written."""
        if self.store is None:
            return
        self._unsaved = True
        if self._saving is None or self._saving.done():
            self._saving = asyncio.get_running_loop().create_task(self._save())

    async def _save(self) -> None:
        assert self.store is not None
        while self._unsaved:
            self._unsaved = False
            text = json.dumps({"messages": [message.as_json() for message in self.messages]})
            try:
                await asyncio.to_thread(write_store, self.store, text)
            except OSError as error:
                log.warning("could not keep the conversation in %s: %s", self.store, error)

    async def flush(self) -> None:
        """Wait for the store to hold the conversation as it is now."""
        if self._saving is not None:
            await self._saving

    def status_json(self) -> dict[str, Any]:
        return {"status": self.status, "agent_type": self.agent_type,
                "last_activity": rfc3339(self.last_activity)}

    def _publish(self, event: Event) -> None:
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # a client that stopped reading is cut off, not waited for
                self._subscribers.discard(queue)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)

    def _message_event(self, message: Message) -> Event:
        return Event("message_update", {"id": message.id, "role": message.role, "message": message.content,
                                        "time": rfc3339(message.time)})

    def set_status(self, status: Status) -> None:
        if status != self.status:
            self.status = status
            if status != "running":  # the turn is over: the next one starts a new agent message
                self._reply = None
                self._save_soon()
            self._publish(Event("status_change", {"status": status, "agent_type": self.agent_type}))

    def add_user_message(self, content: str) -> Message:
        message = Message(len(self.messages), "user", content, now())
        self.messages.append(message)
        self.touch()
        self._save_soon()
        self._publish(self._message_event(message))
        return message

    def _current_reply(self) -> Message:
        if self._reply is None:
            self._reply = Message(len(self.messages), "agent", "", now())
            self.messages.append(self._reply)
        return self._reply

    def append_agent_text(self, text: str) -> None:
        reply = self._current_reply()
        reply.content += text
        self.touch()
        self._publish(self._message_event(reply))

    def track_tool_call(self, call_id: str, **fields: Any) -> None:
        reply = self._current_reply()
        entry = reply.tool_calls.setdefault(call_id, {"id": call_id})
        entry.update({key: value for key, value in fields.items() if value is not None})
        self.touch()
        self._publish(self._message_event(reply))

    def agent_error(self, message: str, *, lasting: bool = False) -> None:
        self.touch()
        event = Event("agent_error", {"message": message, "time": rfc3339(now())})
        if lasting:
            self._lasting_error = event
        self._publish(event)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[Event | None]]:
        """A queue that starts with the current state (every message, the status, a lasting error) and then
        follows."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(SUBSCRIBER_QUEUE)
        for message in self.messages[-(SUBSCRIBER_QUEUE // 2):]:
            queue.put_nowait(self._message_event(message))
        queue.put_nowait(Event("status_change", {"status": self.status, "agent_type": self.agent_type}))
        if self._lasting_error is not None:
            queue.put_nowait(self._lasting_error)
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)
