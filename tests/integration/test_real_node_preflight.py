"""The real node is on by default: a machine that cannot host it (not root, not Debian or Ubuntu) fails at
once, saying how to opt out with AGENTBOX_REAL_NODE=0, before anything is built or created for it.

No cluster: the scripts run with a PATH of a few real tools and stand-ins for `id` and `apt-get`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures.cluster import REPO, cache_dir, read_versions

OPT_OUT = "set AGENTBOX_REAL_NODE=0 for kwok nodes alone"
TOOLS = ("bash", "env", "dirname", "uname", "ls", "cat", "mkdir", "flock", "tr", "sed", "grep", "sort")


def machine(tmp_path: Path, *, uid: int, apt: bool) -> dict[str, str]:
    """An environment whose PATH holds only TOOLS, an `id` that reports `uid`, and apt-get if `apt`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        (bin_dir / tool).symlink_to(shutil.which(tool))
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "id").chmod(0o755)
    if apt:
        for tool in ("apt-get", "dpkg-query"):
            (bin_dir / tool).write_text("#!/bin/sh\nexit 0\n")
            (bin_dir / tool).chmod(0o755)
    return {"PATH": str(bin_dir), "HOME": str(tmp_path), "AGENTBOX_CACHE": str(tmp_path / "cache")}


def run(env: dict[str, str], *command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["/bin/bash", *command], env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("uid", "apt", "cause"), [
    (1000, True, "as root"),
    (0, False, "Debian or Ubuntu"),
])
def test_a_machine_that_cannot_host_the_node_is_told_how_to_opt_out(tmp_path, uid, apt, cause):
    done = run(machine(tmp_path, uid=uid, apt=apt), str(REPO / "hack" / "real-node.sh"), "check-host")
    assert done.returncode == 1, done
    assert cause in done.stderr and OPT_OUT in done.stderr, done.stderr


def test_a_root_debian_machine_passes(tmp_path):
    done = run(machine(tmp_path, uid=0, apt=True), str(REPO / "hack" / "real-node.sh"), "check-host")
    assert done.returncode == 0, done.stderr


def test_the_cluster_is_not_created_for_a_node_that_cannot_run(tmp_path):
    """hack/cluster.sh up stops at the check, not after making a cluster the node never joins."""
    kube_bin = cache_dir() / "bin" / f"kubernetes-{read_versions()['K8S_VERSION']}"
    if not (kube_bin / "kube-apiserver").exists():
        pytest.skip("needs the cluster binaries: `make binaries`")
    env = machine(tmp_path, uid=1000, apt=True) | {"AGENTBOX_CLUSTER_NAME": "preflight"}
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "bin").symlink_to(cache_dir() / "bin")
    done = run(env, str(REPO / "hack" / "cluster.sh"), "up")
    assert done.returncode == 1, done
    assert done.stderr.strip().splitlines()[-1].endswith(OPT_OUT + " (no pod then runs as a container)")
    assert not (tmp_path / "cache" / "kwok" / "clusters" / "preflight").exists()
