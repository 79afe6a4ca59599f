"""One pin for each agent (sandbox/images/agents.json): the runner's commands, the agent image, the
operator's and the chart's default images and the tests' installs (hack/agents.sh) all follow it."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import yaml

from agentbox.operator.build.pod import SANDBOX_UID
from agentbox.operator.settings import OperatorSettings
from agentbox.sandbox.runner.commands import DEFAULT_COMMANDS

REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "sandbox" / "images"
PINS = json.loads((IMAGES / "agents.json").read_text())
DOCKERFILE = (IMAGES / "Dockerfile.agent").read_text()
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


def test_every_runtime_with_a_command_of_its_own_is_pinned_exactly():
    assert set(PINS["agents"]) == set(DEFAULT_COMMANDS) - {"scripted"}
    for runtime, agent in PINS["agents"].items():
        assert DEFAULT_COMMANDS[runtime][0] == agent["bin"], runtime
        assert re.fullmatch(r"\d+\.\d+\.\d+", agent["version"]), f"{runtime}: an exact version"
    assert re.fullmatch(r"\d+\.\d+\.\d+", PINS["node"])


def test_the_agent_image_takes_every_version_from_the_pin_file_and_its_base_from_an_argument():
    assert "COPY sandbox/images/agents.json" in DOCKERFILE
    for agent in PINS["agents"].values():
        assert agent["package"] not in DOCKERFILE and agent["version"] not in DOCKERFILE, (
            "a version written into the Dockerfile would drift from agents.json")
    assert PINS["node"] not in DOCKERFILE and "latest" not in DOCKERFILE
    instructions = [line for line in DOCKERFILE.splitlines() if line and not line.startswith("#")]
    assert instructions[0].startswith("ARG BASE=debian:bookworm-"), "a builder passes its own Debian 12 base"
    stages = [line for line in instructions if line.startswith("FROM")]
    assert stages == ["FROM ${BASE} AS build", "FROM ${BASE}"]


def test_the_agent_image_runs_as_the_pods_user_with_home_on_the_pods_tmp():
    final = DOCKERFILE.split("FROM ${BASE}\n", 1)[1]
    assert f"USER {SANDBOX_UID}:{SANDBOX_UID}" in final
    assert re.search(r"^\s+HOME=/tmp \\$", final, re.M), "the pod mounts an emptyDir at /tmp; / is read-only"
    for tool in ("bash", "git", "ripgrep", "python3"):
        assert re.search(rf"apt-get install .*\b{tool}\b", final), tool


def test_operator_and_chart_default_to_an_agent_image_per_pinned_runtime():
    images = OperatorSettings().agent_images
    assert images == {runtime: f"ghcr.io/agentbox-dev/agent-{runtime}:{VERSION}"
                      for runtime in PINS["agents"]}
    values = yaml.safe_load((REPO / "charts" / "agentbox" / "values.yaml").read_text())
    assert values["sandbox"]["agentImages"] == images
    schema = json.loads((REPO / "charts" / "agentbox" / "values.schema.json").read_text())
    assert set(schema["properties"]["sandbox"]["properties"]["agentImages"]["properties"]) == set(images)
