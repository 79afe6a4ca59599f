"""A runner that gives up on its agent, as the kubelet reports it, turns the session NeedsAuth or Failed
with the runner's own words in the Ready condition and a Warning Event. kwok runs no containers: the
test writes the runner container's status the way a kubelet does."""

import pytest
from fixtures.polling import eventually
from kubernetes_asyncio import client
from operator_harness import session_in_phase, session_manifest

from agentbox.crds import agentsession
from agentbox.operator import naming

pytestmark = pytest.mark.cluster

REFUSAL = ("the agent requires authentication: it refused session/prompt (Invalid API key [-32000]); "
           "claude-code reads ANTHROPIC_API_KEY or CLAUDE_CODE_OAUTH_TOKEN: store a provider key for the "
           "session (its spec.egress.providerKey; the API's /api/v1/provider-keys)")
GAVE_UP = ("gave up after 5 failed starts in a row: agent codex-acp exited with code 1 during the ACP "
           "handshake; its last stderr: Error: spawn codex ENOENT")
ROOT_IMAGE = 'container has runAsNonRoot and image will run as root (pod: "s_t(1)", container: runner)'


def terminated(code: int, message: str) -> dict:
    return {"terminated": {"exitCode": code, "reason": "Error", "message": message,
                           "startedAt": "2026-11-26T11:59:10Z", "finishedAt": "2026-11-26T11:59:20Z"}}


CASES = {
    # Refused, restarted: the runner remembers the refusal and stays up, unready.
    "needs-auth": ({"running": {"startedAt": "2026-11-26T11:59:30Z"}}, terminated(77, REFUSAL),
                   "NeedsAuth", "AgentNeedsAuth", REFUSAL),
    # Gave up after its retries: the kubelet backs off before the next start.
    "agent-failed": ({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s restarting failed "
                                                                           "container=runner"}},
                     terminated(69, GAVE_UP), "Failed", "AgentFailed", GAVE_UP),
    "image-runs-as-root": ({"waiting": {"reason": "CreateContainerConfigError", "message": ROOT_IMAGE}}, None,
                           "Failed", "ContainerConfigError", f"container runner: CreateContainerConfigError: "
                                                             f"{ROOT_IMAGE}"),
}


@pytest.mark.parametrize("case", CASES)
async def test_the_runner_s_verdict_reaches_the_session_and_its_events(operator, kube, ops, tenant, case):
    state, last_state, phase, reason, message = CASES[case]
    await ops.create(session_manifest(case, tenant))
    await session_in_phase(ops, tenant, case, "Running")
    pod_name = naming.child_name(case)
    pod = await ops.get("Pod", tenant, pod_name)
    status = pod["status"]
    for condition in status["conditions"]:
        if condition["type"] in ("Ready", "ContainersReady"):
            condition.update(status="False", reason="ContainersNotReady",
                             message="containers with unready status: [runner]")
    for container in status["containerStatuses"]:
        if container["name"] == "runner":
            container.update(ready=False, started=False, restartCount=1, state=state)
            if last_state:
                container["lastState"] = last_state
    written = {"conditions": status["conditions"], "containerStatuses": status["containerStatuses"]}
    await ops.merge_patch("Pod", tenant, pod_name, {"status": written}, sub="status")

    body = await session_in_phase(ops, tenant, case, phase)
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", reason, message)

    async with kube.api_client() as api:
        core = client.CoreV1Api(api)

        async def warned():
            events = await core.list_namespaced_event(
                tenant, field_selector=f"involvedObject.kind={agentsession.KIND},involvedObject.name={case}")
            return [event for event in events.items if event.reason == reason]

        [event] = await eventually(warned, what=f"a {reason} event")
    assert event.type == "Warning" and event.message == f"{phase}: {message}"
