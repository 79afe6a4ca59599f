"""Pure pieces of the runner: agent commands per runtime, permission policy, path confinement, the
conversation's messages and event fan-out."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from acp.schema import PermissionOption

from agentbox.sandbox.runner import conversation as conversation_module
from agentbox.sandbox.runner.bridge import choose_permission
from agentbox.sandbox.runner.commands import CommandError, agent_command
from agentbox.sandbox.runner.conversation import Conversation
from agentbox.sandbox.runner.failures import EXIT_NEEDS_AUTH, Verdict
from agentbox.sandbox.runner.process import StderrTail
from agentbox.sandbox.runner.settings import RunnerSettings
from agentbox.sandbox.runner.workspace import WorkspaceError, confine


@pytest.mark.parametrize(("runtime", "model", "argv", "env"), [
    ("claude-code", "opus", ["claude-agent-acp"], {"ANTHROPIC_MODEL": "opus"}),
    ("gemini", "flash", ["gemini", "--acp", "--model", "flash"], {}),
    ("codex", "o9", ["codex-acp"], {"CODEX_CONFIG": '{"model": "o9"}'}),
    ("scripted", None, [sys.executable, "-m", "agentbox.sandbox.scripted_agent"], {}),
])
def test_each_runtime_has_its_acp_command(runtime, model, argv, env, tmp_path):
    settings = RunnerSettings(runtime=runtime, agent_model=model)
    launch = agent_command(settings, {"PATH": "/bin", "AGENTBOX_RUNNER_TOKEN_FILE": "/secret"},
                           private_dir=tmp_path)
    assert launch.argv == argv
    assert env.items() <= launch.env.items() and launch.env["PATH"] == "/bin"
    assert "AGENTBOX_RUNNER_TOKEN_FILE" not in launch.env
    assert launch.files == {}, "no system prompt, nothing to write"


def test_custom_needs_a_command_and_a_command_overrides_any_runtime(monkeypatch, tmp_path):
    with pytest.raises(CommandError, match="AGENTBOX_AGENT_COMMAND"):
        agent_command(RunnerSettings(runtime="custom"), {}, private_dir=tmp_path)
    monkeypatch.setenv("AGENTBOX_AGENT_COMMAND", '["my-agent", "--acp"]')
    launch = agent_command(RunnerSettings(runtime="gemini"), {}, private_dir=tmp_path)
    assert launch.argv == ["my-agent", "--acp"]


PROMPT = 'Be careful.\n\tQuote " backslash \\ DEL \x7f bell \x07 snow \u2603 face \U0001F600'


@pytest.mark.parametrize("runtime", ["claude-code", "scripted", "custom"])
def test_acp_meta_runtimes_get_no_prompt_on_their_command_line(runtime, tmp_path, monkeypatch):
    if runtime == "custom":
        monkeypatch.setenv("AGENTBOX_AGENT_COMMAND", '["my-agent"]')
    plain = agent_command(RunnerSettings(runtime=runtime), {"PATH": "/bin"}, private_dir=tmp_path)
    launch = agent_command(RunnerSettings(runtime=runtime), {"PATH": "/bin"}, system_prompt=PROMPT,
                           private_dir=tmp_path)
    assert launch == plain, "these read it from ACP _meta.systemPrompt, which the bridge sends"


def test_gemini_reads_the_prompt_as_its_global_context_file_outside_the_workspace(tmp_path):
    private = tmp_path / "private"
    launch = agent_command(RunnerSettings(runtime="gemini", workspace=tmp_path / "workspace"),
                           {"PATH": "/bin", "HOME": "/home/u"}, system_prompt=PROMPT, private_dir=private)
    assert launch.argv == ["gemini", "--acp"]
    assert launch.env["GEMINI_CLI_HOME"] == str(private / "gemini")
    assert "GEMINI_SYSTEM_MD" not in launch.env, "that would replace Gemini's own instructions"
    context = Path(launch.env["GEMINI_CLI_HOME"]) / ".gemini" / "GEMINI.md"
    assert launch.files == {context: PROMPT}
    launch.write_files()
    assert context.read_text() == PROMPT
    assert not (tmp_path / "workspace").exists()


def test_codex_reads_the_model_and_prompt_from_codex_config(tmp_path):
    """codex-acp takes no flags: its Codex settings come as one JSON object in CODEX_CONFIG."""
    launch = agent_command(RunnerSettings(runtime="codex", agent_model="o9"), {}, system_prompt=PROMPT,
                           private_dir=tmp_path)
    assert launch.argv == ["codex-acp"]
    assert json.loads(launch.env["CODEX_CONFIG"]) == {"model": "o9", "developer_instructions": PROMPT}
    assert launch.files == {}


def test_codex_config_from_agent_env_is_kept_and_extended(tmp_path):
    given = {"CODEX_CONFIG": json.dumps({"model": "old", "developer_instructions": "Mine.", "x": 1})}
    launch = agent_command(RunnerSettings(runtime="codex", agent_model="o9"), given, system_prompt="Ours.",
                           private_dir=tmp_path)
    assert json.loads(launch.env["CODEX_CONFIG"]) == {
        "model": "o9", "developer_instructions": "Mine.\n\nOurs.", "x": 1}
    untouched = agent_command(RunnerSettings(runtime="codex"), given, private_dir=tmp_path)
    assert untouched.env["CODEX_CONFIG"] == given["CODEX_CONFIG"]


@pytest.mark.parametrize(("given", "error"), [("{", "not JSON"), ("[1]", "must be a JSON object")])
def test_codex_config_that_is_no_json_object_is_refused_by_name(given, error, tmp_path):
    with pytest.raises(CommandError, match=f"CODEX_CONFIG: {error}"):
        agent_command(RunnerSettings(runtime="codex"), {"CODEX_CONFIG": given}, system_prompt="p",
                      private_dir=tmp_path)


def test_a_prompt_too_long_for_codex_s_environment_is_refused_by_name(tmp_path):
    codex = RunnerSettings(runtime="codex")
    with pytest.raises(CommandError, match=r"AGENTBOX_SYSTEM_PROMPT_FILE: 196608 bytes .* CODEX_CONFIG"):
        agent_command(codex, {}, system_prompt="\u2603" * 65536, private_dir=tmp_path)
    assert agent_command(codex, {}, system_prompt="x" * 65536, private_dir=tmp_path)  # the CRD allows 65536



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


async def test_the_conversation_outlives_the_runner_in_its_store(tmp_path):
    store = tmp_path / "workspace" / ".agentbox" / "conversation.json"
    chat = Conversation("scripted", store)
    chat.add_user_message("hi")
    chat.set_status("running")
    chat.append_agent_text("hello")
    chat.track_tool_call("t1", title="MCP x", status="completed")
    chat.set_status("stable")
    await chat.flush()
    # A new runner on the same workspace (a resumed or restarted pod) starts from it, and goes on.
    again = Conversation("scripted", store)
    assert [m.as_json() for m in again.messages] == [m.as_json() for m in chat.messages]
    assert again.add_user_message("more").id == 2
    await again.flush()
    assert [m.content for m in Conversation("scripted", store).messages] == ["hi", "hello", "more"]
    assert [path.name for path in store.parent.iterdir()] == ["conversation.json"], "no partial file left"


def test_an_unreadable_store_starts_afresh(tmp_path):
    store = tmp_path / "conversation.json"
    store.write_text("{not json")
    assert Conversation("scripted", store).messages == []


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


def test_the_stderr_tail_keeps_the_last_lines_each_cut_short():
    tail = StderrTail(lines=3, line_chars=10)
    tail.feed(b"one\ntwo\n\nthree\nfo")
    tail.feed(b"ur is longer than ten\nfi")
    assert tail.lines() == ["three", "four is lo", "fi"], "blank lines dropped, the partial last line kept"
    tail.feed(b"x" * 100)  # a line that never ends is kept by its start, not held whole
    assert tail.lines()[-1] == "fixxxxxxxx"
    tail.feed(b"\xff\xfe bytes\n")
    assert tail.lines()[-1] == "\ufffd\ufffd bytes"


def test_a_termination_message_fits_what_the_kubelet_keeps(tmp_path):
    target = tmp_path / "termination-log"
    Verdict(EXIT_NEEDS_AUTH, "é" * 5000).write(target)
    assert target.read_text() == "é" * 2000, "cut at 4000 bytes, never inside a character"
    Verdict(EXIT_NEEDS_AUTH, "nowhere to go").write(None)  # outside a pod: the exit code alone
