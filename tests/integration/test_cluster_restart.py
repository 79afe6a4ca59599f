"""A stopped local cluster that `hack/cluster.sh up` starts again runs pods within seconds.

The restarted kwok-controller has a new identity: it used to leave every fake node unmanaged (pods
Pending) until its predecessor's node leases ran out, 200 s later. This test makes a throwaway cluster of
its own, since it stops it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from pathlib import Path

import pytest
from fixtures.cluster import REPO
from fixtures.polling import eventually
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

pytestmark = pytest.mark.cluster

# Well under the leases' 40 s, so a restarted kwok that waits them out fails this test.
POD_RUNNING_SECONDS = 20


async def cluster_script(name: str, command: str) -> str:
    process = await asyncio.create_subprocess_exec(
        str(REPO / "hack" / "cluster.sh"), command,
        # kwok nodes alone: the machine's one real node serves the test cluster.
        env={**os.environ, "AGENTBOX_CLUSTER_NAME": name, "AGENTBOX_REAL_NODE": "0"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, f"hack/cluster.sh {command}: {stderr.decode()}"
    return stdout.decode().strip()


async def pod_runs(kubeconfig: Path, name: str) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        core = client.CoreV1Api(api)

        async def default_account() -> bool:  # pods are refused until the namespace has it
            try:
                return bool(await core.read_namespaced_service_account("default", "default"))
            except ApiException as error:
                if error.status != 404:
                    raise
                return False

        await eventually(default_account, timeout=30, what="the default ServiceAccount")
        await core.create_namespaced_pod("default", {
            "metadata": {"name": name},
            "spec": {"containers": [{"name": "main", "image": "registry.invalid/none"}]}})

        async def running() -> bool:
            return (await core.read_namespaced_pod(name, "default")).status.phase == "Running"

        await eventually(running, timeout=POD_RUNNING_SECONDS, what=f"pod {name} to be Running")


async def test_a_restarted_cluster_runs_pods_at_once():
    name = f"agentbox-restart-{secrets.token_hex(3)}"
    try:
        kubeconfig = Path((await cluster_script(name, "up")).splitlines()[-1])
        await pod_runs(kubeconfig, "before")
        await cluster_script(name, "stop")
        assert Path((await cluster_script(name, "up")).splitlines()[-1]) == kubeconfig
        await pod_runs(kubeconfig, "after")
    finally:
        await cluster_script(name, "down")
