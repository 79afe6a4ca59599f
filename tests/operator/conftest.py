"""Fixtures of the operator's cluster tests: the operator process and tenant namespaces."""

import contextlib
import os
from collections.abc import AsyncIterator

import pytest_asyncio
from kubernetes_asyncio.client.exceptions import ApiException
from operator_harness import OperatorProcess, finalizers_released

from agentbox.operator.kube import Kube as OperatorKube


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def operator(kube, tmp_path_factory) -> AsyncIterator[OperatorProcess]:
    process = OperatorProcess(str(kube.kubeconfig), str(tmp_path_factory.mktemp("operator") / "operator.log"))
    process.start()
    await process.wait_alive()
    try:
        yield process
        await finalizers_released(kube)
    finally:
        process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def ops(kube) -> AsyncIterator[OperatorKube]:
    """The operator's own API wrapper, pointed at the test cluster (reads and writes as dicts)."""
    async with kube.api_client() as api:
        yield OperatorKube(api)


@pytest_asyncio.fixture(loop_scope="session")
async def tenant(kube, ops) -> AsyncIterator[str]:
    """A fresh tenant namespace inside the operator's scope, labelled agentbox.dev/tenant."""
    name = f"t-op-{os.urandom(3).hex()}"
    org = name.removeprefix("t-")
    await ops.create(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {"agentbox.dev/tenant": org, "agentbox.dev/test-namespace": "true"},
            },
        }
    )
    await kube.wait_for_default_account(name)
    yield name
    with contextlib.suppress(ApiException):
        await ops.delete("Namespace", None, name)
