"""The e2e journeys run on the cluster kind `make e2e CLUSTER=...` names (AGENTBOX_CLUSTER_KIND)."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest


def kind_unavailable() -> str | None:
    """Why a kind cluster cannot run here, or None when it can."""
    if not shutil.which("kind"):
        return "the kind binary is not on PATH"
    if not shutil.which("docker"):
        return "docker is not on PATH"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode != 0:
        return "docker info failed (no running Docker engine)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("AGENTBOX_CLUSTER_KIND", "kwok") != "kind":
        return
    reason = kind_unavailable()
    if reason:
        skip = pytest.mark.skip(reason=f"CLUSTER=kind needs Docker and kind: {reason}; "
                                       "run `make e2e` (kwok, no Docker) instead")
        for item in items:
            if "e2e" in item.keywords:
                item.add_marker(skip)
