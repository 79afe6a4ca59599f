"""The agentapi view of a session: messages, status, last activity, and the event fan-out to SSE clients."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

Role = Literal["user", "agent"]
# agentapi's two (a turn runs, or the agent waits for a message), and the two ways it cannot take one.
Status = Literal["stable", "running", "needs_auth", "failed"]
SUBSCRIBER_QUEUE = 1000


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


@dataclass
class Event:
    kind: str  # message_update | status_change | agent_error
    data: dict[str, Any]


class Conversation:
    def __init__(self, agent_type: str) -> None:
        self.agent_type = agent_type
        self.messages: list[Message] = []
        self.status: Status = "stable"
        self.last_activity: datetime | None = None
        self._subscribers: set[asyncio.Queue[Event | None]] = set()
        self._reply: Message | None = None  # the agent message of the running turn
        self._lasting_error: Event | None = None  # an error that stays true, told to every new subscriber

    def touch(self) -> None:
        self.last_activity = now()

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
            self._publish(Event("status_change", {"status": status, "agent_type": self.agent_type}))

    def add_user_message(self, content: str) -> Message:
        message = Message(len(self.messages), "user", content, now())
        self.messages.append(message)
        self.touch()
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
