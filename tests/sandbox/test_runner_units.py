"""Pure pieces of the runner: agent commands per runtime, permission policy, path confinement, the
conversation's messages and event fan-out."""

from __future__ import annotations

import sys

import pytest
from acp.schema import PermissionOption

from agentbox.sandbox.runner import conversation as conversation_module
from agentbox.sandbox.runner.bridge import choose_permission
from agentbox.sandbox.runner.commands import CommandError, agent_command
from agentbox.sandbox.runner.conversation import Conversation
from agentbox.sandbox.runner.settings import RunnerSettings
from agentbox.sandbox.runner.workspace import WorkspaceError, confine


@pytest.mark.parametrize(("runtime", "model", "argv", "env"), [
    ("claude-code", "opus", ["claude-agent-acp"], {"ANTHROPIC_MODEL": "opus"}),
    ("gemini", "flash", ["gemini", "--experimental-acp", "--model", "flash"], {}),
    ("codex", "o9", ["codex-acp", "-c", "model=o9"], {}),
    ("scripted", None, [sys.executable, "-m", "agentbox.sandbox.scripted_agent"], {}),
])
def test_each_runtime_has_its_acp_command(runtime, model, argv, env):
    settings = RunnerSettings(runtime=runtime, agent_model=model)
    command, environment = agent_command(settings, {"PATH": "/bin", "AGENTBOX_RUNNER_TOKEN_FILE": "/secret"})
    assert command == argv
    assert env.items() <= environment.items() and environment["PATH"] == "/bin"
    assert "AGENTBOX_RUNNER_TOKEN_FILE" not in environment


def test_custom_needs_a_command_and_a_command_overrides_any_runtime(monkeypatch):
    with pytest.raises(CommandError, match="AGENTBOX_AGENT_COMMAND"):
        agent_command(RunnerSettings(runtime="custom"), {})
    monkeypatch.setenv("AGENTBOX_AGENT_COMMAND", '["my-agent", "--acp"]')
    assert agent_command(RunnerSettings(runtime="gemini"), {})[0] == ["my-agent", "--acp"]


def options(*kinds: str) -> list[PermissionOption]:
    return [PermissionOption(option_id=f"id-{kind}", name=kind, kind=kind) for kind in kinds]


def test_permission_policy_picks_the_narrowest_matching_option():
    offered = options("allow_always", "allow_once", "reject_once")
    assert choose_permission("allow", offered).outcome.option_id == "id-allow_once"
    assert choose_permission("deny", offered).outcome.option_id == "id-reject_once"
    assert choose_permission("allow", options("allow_always")).outcome.option_id == "id-allow_always"
    assert choose_permission("deny", options("allow_once")).outcome.outcome == "cancelled"


def test_paths_are_confined_to_the_workspace(tmp_path):
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    assert confine(workspace, "a/b.txt") == workspace.resolve() / "a" / "b.txt"
    assert confine(workspace, str(workspace / "c.txt")) == workspace.resolve() / "c.txt"
    (workspace / "out").symlink_to(tmp_path)
    for bad in ("", ".", "../x", "/etc/passwd", "a/../../x", "out/x", "nul\x00byte"):
        with pytest.raises(WorkspaceError):
            confine(workspace, bad)


async def test_a_turn_builds_one_agent_message_from_chunks_and_tool_calls():
    chat = Conversation("scripted")
    async with chat.subscribe() as queue:
        assert (await queue.get()).data == {"status": "stable", "agent_type": "scripted"}
        chat.set_status("running")
        chat.add_user_message("hi")
        chat.append_agent_text("hel")
        chat.track_tool_call("t1", title="MCP x", status="in_progress")
        chat.track_tool_call("t1", status="completed")
        chat.append_agent_text("lo")
        chat.set_status("stable")
        events = [queue.get_nowait() for _ in range(queue.qsize())]
    assert [event.kind for event in events] == ["status_change"] + ["message_update"] * 5 + ["status_change"]
    assert events[-2].data["message"] == "hello" and events[-2].data["id"] == 1
    assert [m.as_json()["content"] for m in chat.messages] == ["hi", "hello"]
    assert chat.messages[1].as_json()["tool_calls"] == [{"id": "t1", "title": "MCP x", "status": "completed"}]
    assert chat.status_json()["last_activity"].endswith("Z")
    chat.set_status("running")
    chat.append_agent_text("next turn")
    assert len(chat.messages) == 3, "a new turn starts a new agent message"


async def test_a_subscriber_that_stops_reading_is_cut_off_not_waited_for(monkeypatch):
    monkeypatch.setattr(conversation_module, "SUBSCRIBER_QUEUE", 4)
    chat = Conversation("scripted")
    async with chat.subscribe() as slow, chat.subscribe() as other:
        other.get_nowait()  # the opening status
        for index in range(10):
            chat.add_user_message(str(index))
            other.get_nowait()
        items = [slow.get_nowait() for _ in range(slow.qsize())]
        assert items[-1] is None, "the slow client is told its stream ends"
        assert other.qsize() == 0
