"""The API's activity stamp costs the operator nothing: no request of its own reaches the apiserver, and
the idle deadline still moves on with each stamp.

The operator runs here under a ServiceAccount of its own, which a FlowSchema of its own matches: the
apiserver's priority-and-fairness metrics then count every request that operator makes in the session's
namespace, and nobody else's."""

import asyncio
import json
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from kubernetes_asyncio import client
from operator_harness import OperatorProcess, session_in_phase, session_manifest

from agentbox.crds import agentsession
from agentbox.operator import naming

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "hack"))
import chart_identity  # hack/: the token kubeconfig the chart's tests use too

pytestmark = pytest.mark.cluster
ACCOUNT = "activity-operator"
IDLE_SECONDS = 6
DISPATCHED = re.compile(
    r'^apiserver_flowcontrol_dispatched_requests_total\{(?P<labels>[^}]*)\} (?P<count>\S+)$', re.MULTILINE)


async def dispatched(api: client.ApiClient, flow_schema: str) -> int:
    """Requests the apiserver has let through for one FlowSchema so far."""
    text = await api.call_api("/metrics", "GET", auth_settings=["BearerToken"],
                              response_types_map={200: "str"}, _return_http_data_only=True)
    return sum(int(float(match["count"])) for match in DISPATCHED.finditer(text)
               if f'flow_schema="{flow_schema}"' in match["labels"])


async def settled(api: client.ApiClient, flow_schema: str, quiet: float = 2.0, timeout: float = 60) -> int:
    """The operator's request count once it has made none for `quiet` seconds (the last status writes
    and Events of a start land late on a busy machine)."""
    count, deadline = await dispatched(api, flow_schema), time.monotonic() + timeout
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        count, before = await dispatched(api, flow_schema), count
        if count == before:
            return count
    raise AssertionError(f"the operator never went {quiet:g} s without a request in {timeout:g} s")


@pytest_asyncio.fixture(loop_scope="session")
async def counted_operator(kube, tmp_path):
    """(namespace, FlowSchema name): an operator of its own identity serving that one tenant namespace."""
    namespace = f"t-act-{os.urandom(3).hex()}"
    flow_schema = f"agentbox-test-{namespace}"
    subject = {"kind": "ServiceAccount", "serviceAccount": {"name": ACCOUNT, "namespace": namespace}}
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": {
            "agentbox.dev/tenant": namespace.removeprefix("t-"), "agentbox.dev/test-namespace": "true"}}},
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": ACCOUNT, "namespace": namespace}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": flow_schema},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
         "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": namespace}]},
        {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
         "metadata": {"name": flow_schema},
         "spec": {"priorityLevelConfiguration": {"name": "workload-low"}, "matchingPrecedence": 500,
                  "distinguisherMethod": {"type": "ByUser"},
                  # Its requests in this namespace only: other tests' tenant namespaces come and go meanwhile,
                  # and the operator watches every tenant namespace of the cluster.
                  "rules": [{"subjects": [subject],
                             "resourceRules": [{"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"],
                                                "namespaces": [namespace]}]}]}},
    ]
    await kube.kubectl("apply", "--server-side", "-f", "-", input="\n---\n".join(map(json.dumps, objects)))
    try:
        token = (await kube.kubectl("create", "token", ACCOUNT, "-n", namespace, "--duration", "1h")).strip()
        admin = json.loads(await kube.kubectl("config", "view", "--raw", "--minify", "--flatten",
                                              "-o", "json"))
        kubeconfig = tmp_path / "operator.kubeconfig"
        chart_identity.write_private(kubeconfig, yaml.safe_dump(
            chart_identity.token_kubeconfig(admin, token, f"{namespace}:{ACCOUNT}")))
        operator = OperatorProcess(str(kubeconfig), str(tmp_path / "operator.log"), scope=namespace)
        operator.start()
        try:
            await operator.wait_alive()
            yield namespace, flow_schema
        finally:
            operator.stop()
    finally:
        await kube.kubectl("delete", "--ignore-not-found", "--wait=false", f"namespace/{namespace}",
                           f"clusterrolebinding/{flow_schema}", f"flowschema/{flow_schema}")


def _stamp(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_activity_stamps_cost_the_operator_nothing_and_still_move_the_idle_deadline(
        kube, ops, counted_operator):
    namespace, flow_schema = counted_operator
    await ops.create(session_manifest("busy", namespace, lifecycle={"idleTimeout": f"{IDLE_SECONDS}s"}))
    await session_in_phase(ops, namespace, "busy", "Running")
    async with kube.api_client() as api:
        before = await settled(api, flow_schema)
        assert before > 0, "the FlowSchema counts none of the operator's requests"
        # Stamps past the first idle deadline: the expiry check must move on in memory, not wake to look.
        stamp = None
        for _ in range(IDLE_SECONDS + 2):
            stamp = _stamp(datetime.now(UTC))
            await ops.merge_patch(agentsession.KIND, namespace, "busy",
                                  {"metadata": {"annotations": {naming.LAST_ACTIVITY_ANNOTATION: stamp}}})
            await asyncio.sleep(1.1)
        assert await dispatched(api, flow_schema) == before, "the operator made requests for activity stamps"

    # Running until the idle timeout has passed counted from the last stamp, and Suspended soon after.
    deadline = datetime.fromisoformat(stamp) + timedelta(seconds=IDLE_SECONDS)
    while datetime.now(UTC) < deadline - timedelta(seconds=0.5):
        body = await ops.get(agentsession.KIND, namespace, "busy")
        assert body["status"]["phase"] == "Running", f"idle before {deadline}: {body['status']}"
        await asyncio.sleep(0.25)
    body = await session_in_phase(ops, namespace, "busy", "Suspended", timeout=5)
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], body["status"]["lastActivityTime"]) == ("IdleTimeoutReached", stamp)
    assert ready["message"].startswith(f"no activity since {stamp}")
