"""Session status from observed state: phases, conditions and reasons without a cluster."""

from datetime import UTC, datetime, timedelta

import pytest

from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.crds.conditions import Reason
from agentbox.operator import naming
from agentbox.operator.build.mcp import Problem
from agentbox.operator.status import (
    RUNNER_EXIT_REASONS,
    Observed,
    container_failure,
    derive,
    expiry,
    idle,
    invalid_spec,
    next_deadline,
    pod_failure,
    suspension_patch,
)
from agentbox.sandbox.runner import failures as runner_failures

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def observe(spec=None, **seen):
    spec = AgentSessionSpec.model_validate({"tenant": {"org": "acme", "user": "u"}, **(spec or {})})
    return Observed(
        generation=3, spec=spec, name="s", namespace="tenant-acme", created=NOW - timedelta(hours=1), **seen
    )


def pod(phase="Running", ready=True, scheduled=True, waiting=None, unschedulable_message=None):
    conditions = [
        {"type": "PodScheduled", "status": "True" if scheduled else "False"},
        {"type": "Ready", "status": "True" if ready else "False"},
    ]
    if unschedulable_message:
        conditions[0].update(reason="Unschedulable", message=unschedulable_message)
    statuses = (
        [{"name": "runner", "state": {"waiting": {"reason": waiting, "message": "boom"}}}] if waiting else []
    )
    return {
        "spec": {"nodeName": "n1"},
        "status": {
            "phase": phase,
            "conditions": conditions,
            "containerStatuses": statuses,
            "startTime": "2026-11-26T11:59:00Z",
        },
    }


BOUND = {"status": {"phase": "Bound"}}


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_running_session():
    status = derive(observe(pod=pod(), pvc=BOUND, mcp_problems=()), NOW)
    assert status["phase"] == "Running"
    assert conditions(status) == {
        "Ready": ("True", "SessionReady"),
        "PodScheduled": ("True", "Scheduled"),
        "WorkspaceReady": ("True", "ClaimBound"),
        "MCPReady": ("True", "NoServersReferenced"),
        "Suspended": ("False", "NotSuspended"),
    }
    assert status["observedGeneration"] == 3 and all(
        c["observedGeneration"] == 3 for c in status["conditions"]
    )
    assert status["readyAt"] == "2026-11-26T12:00:00Z" and status["startedAt"] == "2026-11-26T11:59:00Z"
    assert status["endpoint"] == naming.endpoint(naming.child_name("s"), "tenant-acme") and status["podName"]


@pytest.mark.parametrize(
    ("observed_pod", "reason"),
    [
        (pod(ready=False, waiting="ErrImagePull"), Reason.IMAGE_PULL_FAILED),
        (pod(ready=False, waiting="ImagePullBackOff"), Reason.IMAGE_PULL_FAILED),
        (pod(ready=False, waiting="CrashLoopBackOff"), Reason.CRASH_LOOP),
        (pod(ready=False, waiting="CreateContainerConfigError"), Reason.CONTAINER_CONFIG_ERROR),
        (pod(phase="Failed", ready=False), Reason.POD_FAILED),
        (
            pod(
                phase="Pending",
                ready=False,
                scheduled=False,
                unschedulable_message="0/2 nodes: Insufficient cpu",
            ),
            Reason.UNSCHEDULABLE,
        ),
    ],
)
def test_failing_pods_fail_the_session_early(observed_pod, reason):
    status = derive(observe(pod=observed_pod, pvc=BOUND, mcp_problems=()), NOW)
    assert status["phase"] == "Failed" and conditions(status)["Ready"] == ("False", reason)


def test_waiting_for_the_claim_is_pending_not_failed():
    observed = pod(
        phase="Pending",
        ready=False,
        scheduled=False,
        unschedulable_message="pod has unbound immediate PersistentVolumeClaims",
    )
    status = derive(observe(pod=observed, pvc={"status": {"phase": "Pending"}}, mcp_problems=()), NOW)
    assert status["phase"] == "Pending" and conditions(status)["WorkspaceReady"] == ("False", "ClaimPending")


def test_the_scheduler_holding_the_pod_for_its_claim_changes_no_status():
    """Most new sessions' pods meet the scheduler before their claim binds: that is no status write."""
    for message in ("0/2 nodes are available: pod has unbound immediate PersistentVolumeClaims.",
                    '0/2 nodes are available: persistentvolumeclaim "s-1a2b3c4d" not found.'):
        held = pod(phase="Pending", ready=False, scheduled=False, unschedulable_message=message)
        fresh = {**held, "status": {**held["status"], "conditions": []}}  # as the first pass saw it
        just_created = derive(observe(pod=fresh, pvc=None, mcp_problems=()), NOW)
        status = derive(observe(pod=held, pvc={"status": {"phase": "Pending"}}, previous=just_created,
                                mcp_problems=()), NOW)
        assert status == just_created


def test_a_pod_held_for_its_claim_says_so():
    """Until a claim that binds on its own is bound, no pod exists: the session says what it waits for."""
    held = derive(observe(pod=None, pvc={"status": {"phase": "Pending"}}, mcp_problems=()), NOW)
    assert held["phase"] == "Pending" and held["podName"] is None
    assert conditions(held)["PodScheduled"] == ("False", "WaitingForWorkspace")
    assert conditions(held)["WorkspaceReady"] == ("False", "ClaimPending")
    lost = derive(observe(pod=None, pvc=BOUND, mcp_problems=()), NOW)
    assert conditions(lost)["PodScheduled"] == ("False", "PodMissing")
    unseen = derive(observe(pod=None, pvc=None, mcp_problems=()), NOW)  # the claim was not looked at
    assert conditions(unseen)["PodScheduled"] == ("False", "PodMissing")


def test_starting_and_pending():
    assert derive(observe(pod=pod(ready=False), pvc=BOUND, mcp_problems=()), NOW)["phase"] == "Starting"
    status = derive(observe(pod=None, mcp_problems=()), NOW)
    assert status["phase"] == "Pending" and status["podName"] is None


def test_suspended_expired_conflict_terminating():
    suspended = derive(observe({"lifecycle": {"suspend": True}}, pvc=BOUND, mcp_problems=()), NOW)
    assert suspended["phase"] == "Suspended" and conditions(suspended)["Suspended"] == (
        "True",
        "SuspendedByUser",
    )
    expired = derive(observe({"lifecycle": {"shutdownTime": "2026-11-26T11:00:00Z"}}, mcp_problems=()), NOW)
    assert expired["phase"] == "Expired" and conditions(expired)["Ready"][1] == "ShutdownTimeReached"
    conflict = derive(observe(conflict="ConfigMap x is foreign", mcp_problems=()), NOW)
    assert conflict["phase"] == "Failed" and conditions(conflict)["Ready"] == ("False", "NameConflict")
    assert derive(observe(deleting=True, mcp_problems=()), NOW)["phase"] == "Terminating"


def test_idle_timeout_counts_from_the_latest_activity():
    spec = {"lifecycle": {"idleTimeout": "30m"}}
    recent = {naming.LAST_ACTIVITY_ANNOTATION: "2026-11-26T11:45:00Z"}
    assert idle(observe(spec, annotations=recent), NOW) is None
    assert next_deadline(observe(spec, annotations=recent), NOW) == NOW + timedelta(minutes=15)
    stale = {naming.LAST_ACTIVITY_ANNOTATION: "2026-11-26T11:00:00Z"}
    assert "no activity since 2026-11-26T11:00:00Z" in idle(observe(spec, annotations=stale), NOW)
    # No activity at all: counted from creation (an hour ago).
    assert idle(observe(spec), NOW) is not None
    assert (
        derive(observe(spec, annotations=recent, mcp_problems=()), NOW)["lastActivityTime"]
        == "2026-11-26T11:45:00Z"
    )


def test_idleness_suspends_rather_than_expires():
    spec = {"lifecycle": {"idleTimeout": "30m"}}
    assert expiry(observe(spec), NOW) is None
    assert suspension_patch(observe(spec), NOW) == {
        "metadata": {"annotations": {naming.SUSPEND_REASON_ANNOTATION: "IdleTimeoutReached"}},
        "spec": {"lifecycle": {"suspend": True}},
    }
    # Once the patch is in, the session reads Suspended for idleness, and nothing more is due.
    marked = {naming.SUSPEND_REASON_ANNOTATION: "IdleTimeoutReached"}
    suspended = observe({"lifecycle": {"idleTimeout": "30m", "suspend": True}}, annotations=marked,
                        pvc=BOUND, mcp_problems=())
    status = derive(suspended, NOW)
    assert status["phase"] == "Suspended"
    assert conditions(status)["Suspended"] == ("True", "IdleTimeoutReached")
    assert conditions(status)["Ready"] == ("False", "IdleTimeoutReached")
    assert next(c for c in status["conditions"] if c["type"] == "Ready")["message"].startswith(
        "no activity since 2026-11-26T11:00:00Z (idleTimeout 30m): pod deleted, workspace kept")
    assert suspension_patch(suspended, NOW) is None and next_deadline(suspended, NOW) is None
    # A user's suspend (no reason annotation) stays a user's.
    by_user = observe({"lifecycle": {"idleTimeout": "30m", "suspend": True}}, mcp_problems=())
    assert conditions(derive(by_user, NOW))["Suspended"] == ("True", "SuspendedByUser")


def test_a_resumed_session_gets_a_full_idle_timeout_again():
    spec = {"lifecycle": {"idleTimeout": "30m"}}
    marked = {naming.SUSPEND_REASON_ANNOTATION: "IdleTimeoutReached"}
    was_suspended = derive(observe({"lifecycle": {"idleTimeout": "30m", "suspend": True}}, annotations=marked,
                                   previous={"readyAt": "2026-11-26T10:00:00Z"}, mcp_problems=()),
                           NOW - timedelta(minutes=40))
    # Resumed by clearing lifecycle.suspend (kubectl): the clock starts now, not at the old activity, and
    # the stale reason goes.
    resumed = observe(spec, annotations=marked, previous=was_suspended, mcp_problems=())
    assert idle(resumed, NOW) is None
    assert suspension_patch(resumed, NOW) == {
        "metadata": {"annotations": {naming.SUSPEND_REASON_ANNOTATION: None}}}
    status = derive(resumed, NOW)
    assert conditions(status)["Suspended"] == ("False", "NotSuspended")
    # Later passes count from the moment Suspended turned False.
    later = observe(spec, previous=status, mcp_problems=())
    assert idle(later, NOW + timedelta(minutes=29)) is None
    assert idle(later, NOW + timedelta(minutes=30)) is not None
    # ...or from the moment the new pod turned Ready, when that came later: starting is not idling.
    ready = derive(observe(spec, previous=status, pod=pod(), pvc=BOUND, mcp_problems=()),
                   NOW + timedelta(minutes=2))
    assert idle(observe(spec, previous=ready), NOW + timedelta(minutes=31)) is None
    assert idle(observe(spec, previous=ready), NOW + timedelta(minutes=32)) is not None


def test_mcp_problems_and_kept_verdict():
    spec = {"mcpServers": [{"name": "gh"}]}
    status = derive(
        observe(spec, mcp_problems=(Problem(Reason.SERVER_NOT_FOUND, "MCPServer gh not found"),)), NOW
    )
    assert conditions(status)["MCPReady"] == ("False", "MCPServerNotFound")
    assert derive(observe(spec, mcp_problems=()), NOW)["conditions"][3]["reason"] == "AllServersReady"
    # A status-only refresh (mcp_problems None) keeps the last verdict.
    kept = derive(observe(spec, previous=status), NOW + timedelta(minutes=1))
    assert conditions(kept)["MCPReady"] == ("False", "MCPServerNotFound")


def test_transition_times_move_only_on_change():
    first = derive(observe(pod=pod(ready=False), pvc=BOUND, mcp_problems=()), NOW)
    later = NOW + timedelta(minutes=5)
    same = derive(observe(pod=pod(ready=False), pvc=BOUND, mcp_problems=(), previous=first), later)
    assert same["conditions"] == first["conditions"]
    ready = derive(observe(pod=pod(), pvc=BOUND, mcp_problems=(), previous=first), later)
    by_type = {c["type"]: c for c in ready["conditions"]}
    assert by_type["Ready"]["lastTransitionTime"] == "2026-11-26T12:05:00Z"
    assert by_type["WorkspaceReady"]["lastTransitionTime"] == "2026-11-26T12:00:00Z"


def test_a_refused_resize_is_on_the_workspace_and_the_session_runs_on():
    status = derive(observe(pod=pod(), pvc=BOUND, mcp_problems=(), claim_refused="no expansion"), NOW)
    assert status["phase"] == "Running"
    assert conditions(status)["WorkspaceReady"] == ("False", Reason.CLAIM_UPDATE_REFUSED)
    assert conditions(status)["Ready"][0] == "True"
    pending = derive(observe(pvc={"status": {"phase": "Pending"}}, mcp_problems=(), claim_refused="x"), NOW)
    assert conditions(pending)["WorkspaceReady"] == ("False", Reason.CLAIM_UPDATE_REFUSED)
    assert conditions(pending)["PodScheduled"][1] == Reason.WAITING_FOR_WORKSPACE


def test_an_unreadable_spec_fails_the_session_and_keeps_the_other_conditions():
    running = derive(observe(pod=pod(), pvc=BOUND, mcp_problems=()), NOW)
    later = NOW + timedelta(minutes=1)
    status = invalid_spec(running, 4, "spec.agent.image: bad", later)
    assert status["phase"] == "Failed" and status["observedGeneration"] == 4
    by_type = {c["type"]: c for c in status["conditions"]}
    assert by_type["Ready"] | {"lastTransitionTime": None} == {
        "type": "Ready", "status": "False", "reason": Reason.INVALID_SPEC, "message": "spec.agent.image: bad",
        "observedGeneration": 4, "lastTransitionTime": None}
    assert by_type["Ready"]["lastTransitionTime"] == "2026-11-26T12:01:00Z"
    kept = {c["type"]: c for c in running["conditions"] if c["type"] != "Ready"}
    assert {kind: c for kind, c in by_type.items() if kind != "Ready"} == kept


def test_pod_failure_ignores_healthy_waiting():
    assert pod_failure(pod(ready=False, waiting="ContainerCreating")) is None


# -- the runner's container, as a kubelet writes it ---------------------------------------------------
REFUSAL = "the agent requires authentication: it refused session/prompt (Invalid API key [-32000])"


def runner_status(state, last=None, ready=False, name="runner"):
    status = {"name": name, "ready": ready, "restartCount": 1 if last else 0, "state": state}
    if last:
        status["lastState"] = {"terminated": last}
    return status


def terminated(code, message=None, reason="Error"):
    return {"exitCode": code, "reason": reason, **({"message": message} if message else {}),
            "startedAt": "2026-11-26T11:59:10Z", "finishedAt": "2026-11-26T11:59:20Z"}


def pod_with(*container_statuses, ready=False):
    observed = pod(ready=ready)
    observed["status"]["containerStatuses"] = list(container_statuses)
    return observed


BACK_OFF = {"waiting": {"reason": "CrashLoopBackOff",
                        "message": "back-off 10s restarting failed container=runner pod=s-abc"}}
RUNNING = {"running": {"startedAt": "2026-11-26T11:59:30Z"}}


def test_the_runner_s_exit_codes_are_the_ones_the_sandbox_uses():
    assert RUNNER_EXIT_REASONS == {runner_failures.EXIT_AGENT_FAILED: Reason.AGENT_FAILED,
                                   runner_failures.EXIT_NEEDS_AUTH: Reason.AGENT_NEEDS_AUTH}


@pytest.mark.parametrize("state", [
    {"terminated": terminated(77, REFUSAL)},  # just exited
    BACK_OFF,  # waiting to be restarted: the kubelet backs off
    RUNNING,  # restarted: it remembers the refusal and stays unready
], ids=["terminated", "back-off", "restarted"])
def test_a_runner_refused_for_authentication_makes_the_session_need_auth(state):
    last = None if "terminated" in state else terminated(77, REFUSAL)
    status = derive(observe(pod=pod_with(runner_status(state, last)), pvc=BOUND, mcp_problems=()), NOW)
    assert status["phase"] == "NeedsAuth"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["message"]) == ("False", "AgentNeedsAuth", REFUSAL)


def test_a_runner_that_gave_up_on_its_agent_fails_the_session_with_its_reason():
    message = "gave up after 5 failed starts in a row: agent codex-acp exited with code 1"
    status = derive(observe(pod=pod_with(runner_status(BACK_OFF, terminated(69, message))), pvc=BOUND,
                            mcp_problems=()), NOW)
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["reason"], ready["message"]) == ("AgentFailed", message)


def test_a_runner_whose_agent_recovered_is_running_whatever_its_last_exit():
    recovered = pod_with(runner_status(RUNNING, terminated(69, "gave up ..."), ready=True), ready=True)
    assert derive(observe(pod=recovered, pvc=BOUND, mcp_problems=()), NOW)["phase"] == "Running"


@pytest.mark.parametrize(("container", "reason", "message"), [
    # Any other crash loop says how the container last ended: its log's tail (FallbackToLogsOnError).
    (runner_status(BACK_OFF, terminated(1, "AGENTBOX_RUNNER_TOKEN_FILE /var/run/x: is empty\n")),
     Reason.CRASH_LOOP, "container runner: CrashLoopBackOff: back-off 10s restarting failed container=runner "
                        "pod=s-abc; exited with code 1 (Error): AGENTBOX_RUNNER_TOKEN_FILE /var/run/x: "
                        "is empty"),
    (runner_status(BACK_OFF), Reason.CRASH_LOOP,
     "container runner: CrashLoopBackOff: back-off 10s restarting failed container=runner pod=s-abc"),
    # An image that cannot run the runner's command.
    (runner_status(BACK_OFF, terminated(128, 'exec: "python": executable file not found in $PATH',
                                        reason="StartError")),
     Reason.CONTAINER_CONFIG_ERROR,
     'container runner: exited with code 128 (StartError): exec: "python": executable file not found in '
     '$PATH'),
    (runner_status({"waiting": {"reason": "CreateContainerConfigError",
                                "message": "container has runAsNonRoot and image will run as root (pod: "
                                           "\"s-abc_tenant-acme(1)\", container: runner)"}}),
     Reason.CONTAINER_CONFIG_ERROR,
     'container runner: CreateContainerConfigError: container has runAsNonRoot and image will run as root '
     '(pod: "s-abc_tenant-acme(1)", container: runner)'),
    (runner_status({"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x:1\""}}),
     Reason.IMAGE_PULL_FAILED, 'container runner: ImagePullBackOff: Back-off pulling image "x:1"'),
    # The runner's exit codes mean nothing from another container.
    (runner_status(BACK_OFF, terminated(77), name="gateway"), Reason.CRASH_LOOP,
     "container gateway: CrashLoopBackOff: back-off 10s restarting failed container=runner pod=s-abc; "
     "exited with code 77 (Error)"),
])
def test_a_container_s_state_says_why_the_session_failed(container, reason, message):
    assert container_failure(container) == (reason, message)


def test_a_container_starting_or_running_is_no_failure():
    assert container_failure(runner_status({"waiting": {"reason": "ContainerCreating"}})) is None
    assert container_failure(runner_status(RUNNING, terminated(1, "crashed once"))) is None
