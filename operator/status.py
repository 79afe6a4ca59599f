"""Session status from observed state: a pure function of spec, pod, claim and MCP problems."""

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.crds.conditions import ConditionStatus, Reason, SessionPhase
from agentbox.crds.conditions import ConditionType as Kind
from agentbox.crds.fields import parse_duration
from agentbox.operator import naming
from agentbox.operator.build.mcp import Problem
from agentbox.operator.build.pod import RUNNER_CONTAINER

IMAGE_PULL_REASONS = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"}
# CreateContainerConfigError covers "container has runAsNonRoot and image will run as root" as well.
CONFIG_ERROR_REASONS = {"CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
# The exit codes of a runner that gave up on its agent, its termination message saying why
# (agentbox.sandbox.runner.failures, which the operator cannot import: the values are repeated here).
RUNNER_EXIT_REASONS = {69: Reason.AGENT_FAILED, 77: Reason.AGENT_NEEDS_AUTH}
FAILURE_PHASES = {Reason.AGENT_NEEDS_AUTH: SessionPhase.NEEDS_AUTH}  # every other failure is Failed


@dataclass(frozen=True)
class Observed:
    """What the operator saw of a session's world at one moment."""

    generation: int
    spec: AgentSessionSpec
    name: str
    namespace: str
    created: datetime
    annotations: dict[str, str] = field(default_factory=dict)
    previous: dict[str, Any] = field(default_factory=dict)
    pod: dict[str, Any] | None = None
    pvc: dict[str, Any] | None = None
    mcp_problems: tuple[Problem, ...] | None = None  # None: not looked at this time, keep the last
    conflict: str | None = None
    blocked: tuple[Reason, str] | None = None  # the apiserver refused a write (quota, admission, error)
    claim_refused: str | None = None  # the apiserver refused a change of the workspace claim (a resize)
    deleting: bool = False

    @property
    def child_name(self) -> str:
        return naming.session_child_name(self.name, self.annotations)


def format_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def last_activity(observed: Observed) -> datetime | None:
    moments = [parse_time(observed.annotations.get(naming.LAST_ACTIVITY_ANNOTATION)),
               parse_time(observed.previous.get("lastActivityTime"))]
    known = [moment for moment in moments if moment is not None]
    return max(known) if known else None


def expiry(observed: Observed, now: datetime) -> tuple[Reason, str] | None:
    """Why the session has expired for good, if it has (idleness suspends instead: see `idle`)."""
    shutdown_time = observed.spec.lifecycle.shutdown_time
    if shutdown_time is not None and now >= shutdown_time:
        return Reason.SHUTDOWN_TIME_REACHED, f"shutdownTime {format_time(shutdown_time)} reached"
    return None


def _previous_condition(observed: Observed, kind: Kind) -> dict[str, Any]:
    return next((c for c in observed.previous.get("conditions") or [] if c.get("type") == str(kind)), {})


def _resumed_at(observed: Observed, now: datetime) -> datetime | None:
    """When the session last left suspension: `now` when this pass resumes it, else the moment its
    Suspended condition last turned False."""
    before = _previous_condition(observed, Kind.SUSPENDED)
    if before.get("status") == ConditionStatus.TRUE:
        return now
    return parse_time(before.get("lastTransitionTime"))


def _ready_since(observed: Observed) -> datetime | None:
    """When the pod last turned Ready: a resumed or replaced pod's start is no idle time."""
    ready = _previous_condition(observed, Kind.READY)
    turned_ready = parse_time(ready.get("lastTransitionTime"))
    return turned_ready if ready.get("status") == ConditionStatus.TRUE else None


def idle_since(observed: Observed, now: datetime) -> datetime:
    """Where the idle clock starts: the latest activity, resume, readiness or the creation."""
    moments = [last_activity(observed), _resumed_at(observed, now), _ready_since(observed),
               parse_time(observed.previous.get("readyAt")), observed.created]
    return max(moment for moment in moments if moment is not None)


def idle(observed: Observed, now: datetime) -> str | None:
    """Why a running session is now suspended for idleness (idleTimeout without activity), if it is."""
    lifecycle = observed.spec.lifecycle
    if lifecycle.suspend or not lifecycle.idle_timeout:
        return None
    since = idle_since(observed, now)
    if now - since < parse_duration(lifecycle.idle_timeout):
        return None
    return f"no activity since {format_time(since)} (idleTimeout {lifecycle.idle_timeout})"


def suspended_for_idleness(observed: Observed) -> bool:
    """Suspended by the operator for idleness (a message resumes it), not by a user."""
    return observed.spec.lifecycle.suspend and (
        observed.annotations.get(naming.SUSPEND_REASON_ANNOTATION) == Reason.IDLE_TIMEOUT_REACHED)


def suspension_patch(observed: Observed, now: datetime) -> dict[str, Any] | None:
    """The merge patch the session needs for idleness, if any: suspend an idle one (the reason beside the
    flag, so `kubectl get` shows one switch and a message through the API knows it may resume it), or
    drop the reason once something else resumed it (else a user's later suspend would read as idleness)."""
    if idle(observed, now) is not None:
        reason = {naming.SUSPEND_REASON_ANNOTATION: str(Reason.IDLE_TIMEOUT_REACHED)}
        return {"metadata": {"annotations": reason}, "spec": {"lifecycle": {"suspend": True}}}
    if not observed.spec.lifecycle.suspend and naming.SUSPEND_REASON_ANNOTATION in observed.annotations:
        return {"metadata": {"annotations": {naming.SUSPEND_REASON_ANNOTATION: None}}}
    return None


def next_deadline(observed: Observed, now: datetime) -> datetime | None:
    """The moment the session would expire or be suspended for idleness if nothing happens."""
    lifecycle = observed.spec.lifecycle
    deadlines = []
    if lifecycle.shutdown_time is not None:
        deadlines.append(lifecycle.shutdown_time)
    if lifecycle.idle_timeout and not lifecycle.suspend:
        deadlines.append(idle_since(observed, now) + parse_duration(lifecycle.idle_timeout))
    return min(deadlines) if deadlines else None


def pod_failure(pod: dict[str, Any]) -> tuple[Reason, str] | None:
    """A pod that will not get better on its own: the session turns Failed (or NeedsAuth) right away."""
    status = pod.get("status") or {}
    if status.get("phase") == "Failed":
        return Reason.POD_FAILED, status.get("message") or status.get("reason") or "pod failed"
    for container in [*status.get("initContainerStatuses", []), *status.get("containerStatuses", [])]:
        failure = container_failure(container)
        if failure is not None:
            return failure
    return None


def container_failure(container: dict[str, Any]) -> tuple[Reason, str] | None:
    """What a container's status, as the kubelet writes it, says is wrong for good; None if nothing."""
    name = container.get("name")
    state = container.get("state") or {}
    waiting = state.get("waiting") or {}
    # The termination that counts: the current one, else the last one before the restart under way.
    terminated = state.get("terminated") or (container.get("lastState") or {}).get("terminated") or {}
    code = terminated.get("exitCode")
    if name == RUNNER_CONTAINER and code in RUNNER_EXIT_REASONS and not container.get("ready"):
        return RUNNER_EXIT_REASONS[code], terminated.get("message") or f"the runner exited with code {code}"
    reason = waiting.get("reason")
    detail = f"container {name}: {reason}: {waiting.get('message', '')}".rstrip(": ")
    if reason in IMAGE_PULL_REASONS:
        return Reason.IMAGE_PULL_FAILED, detail
    if reason in CONFIG_ERROR_REASONS:
        return Reason.CONTAINER_CONFIG_ERROR, detail
    if terminated.get("reason") == "StartError" and not state.get("running"):  # the image cannot run it
        return Reason.CONTAINER_CONFIG_ERROR, f"container {name}: {_termination(terminated)}"
    if reason == "CrashLoopBackOff":
        return Reason.CRASH_LOOP, f"{detail}; {_termination(terminated)}" if terminated else detail
    return None


def _termination(terminated: dict[str, Any]) -> str:
    """How a container last ended: exit code, the kubelet's reason, and its termination message (the
    runner's own, or the tail of its log: terminationMessagePolicy FallbackToLogsOnError)."""
    text = f"exited with code {terminated.get('exitCode')} ({terminated.get('reason', 'unknown')})"
    return f"{text}: {terminated['message'].strip()}" if terminated.get("message") else text


def _pod_condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return {}


def _condition(kind: Kind, ok: bool | None, reason: Reason, message: str) -> dict[str, Any]:
    status = ConditionStatus.UNKNOWN if ok is None else ConditionStatus.TRUE if ok else ConditionStatus.FALSE
    return {"type": str(kind), "status": str(status), "reason": str(reason), "message": message}


def _workspace_condition(phase: str | None, refused: str | None) -> dict[str, Any]:
    if phase == "Lost":
        return _condition(Kind.WORKSPACE_READY, False, Reason.CLAIM_LOST, "workspace volume was lost")
    if refused:
        return _condition(Kind.WORKSPACE_READY, False, Reason.CLAIM_UPDATE_REFUSED,
                          f"the workspace claim keeps its size: {refused}")
    if phase == "Bound":
        return _condition(Kind.WORKSPACE_READY, True, Reason.CLAIM_BOUND, "workspace claim is bound")
    return _condition(Kind.WORKSPACE_READY, False, Reason.CLAIM_PENDING,
                      "waiting for the workspace claim to bind")


def _mcp_condition(observed: Observed) -> dict[str, Any] | None:
    if observed.mcp_problems is None:
        return None
    if not observed.spec.mcp_servers:
        return _condition(Kind.MCP_READY, True, Reason.NO_SERVERS, "no MCP servers referenced")
    if not observed.mcp_problems:
        return _condition(Kind.MCP_READY, True, Reason.ALL_SERVERS_READY,
                          f"{len(observed.spec.mcp_servers)} MCP server(s) ready")
    first = observed.mcp_problems[0]
    return _condition(Kind.MCP_READY, False, first.reason,
                      "; ".join(problem.message for problem in observed.mcp_problems))


def waiting_for_claim(pod_condition: dict[str, Any]) -> bool:
    """The scheduler holds the pod back until its workspace claim binds: a wait, not a failure."""
    return (pod_condition.get("reason") == "Unschedulable"
            and "persistentvolumeclaim" in pod_condition.get("message", "").lower())


def _scheduled_condition(pod: dict[str, Any] | None, wanted: bool, claim_pending: bool) -> dict[str, Any]:
    if pod is None:
        if wanted and claim_pending:
            return _condition(Kind.POD_SCHEDULED, False, Reason.WAITING_FOR_WORKSPACE,
                              "the sandbox pod is created once the workspace claim is bound")
        reason = Reason.POD_MISSING if wanted else Reason.SUSPENDED_BY_USER
        return _condition(Kind.POD_SCHEDULED, False, reason, "no sandbox pod")
    scheduled = _pod_condition(pod, "PodScheduled")
    if scheduled.get("status") == "True":
        return _condition(Kind.POD_SCHEDULED, True, Reason.SCHEDULED,
                          f"on node {(pod.get('spec') or {}).get('nodeName', '')}".strip())
    if scheduled.get("reason") == "Unschedulable" and not waiting_for_claim(scheduled):
        return _condition(Kind.POD_SCHEDULED, False, Reason.UNSCHEDULABLE,
                          scheduled.get("message", "no node fits the pod"))
    # Held back for the claim reads the same (WorkspaceReady says why): the scheduler's verdict on a
    # claim that binds a moment later is no status write.
    return _condition(Kind.POD_SCHEDULED, False, Reason.SCHEDULING_PENDING, "waiting for the scheduler")


def _stamped(condition: dict[str, Any], previous: dict[str, dict[str, Any]], generation: int,
             now: datetime) -> dict[str, Any]:
    """The condition with its generation, and its lastTransitionTime kept while its status is unchanged."""
    condition = {key: value for key, value in condition.items()
                 if key not in ("lastTransitionTime", "observedGeneration")}
    before = previous.get(condition["type"], {})
    unchanged = before.get("status") == condition["status"] and before.get("lastTransitionTime")
    condition["lastTransitionTime"] = before["lastTransitionTime"] if unchanged else format_time(now)
    condition["observedGeneration"] = generation
    return condition


def invalid_spec(previous: dict[str, Any], generation: int, message: str, now: datetime) -> dict[str, Any]:
    """The status of a session whose spec the operator cannot read (admission let it through, an older CRD
    perhaps): Failed, Ready False InvalidSpec, the other conditions as they were."""
    conditions = {c.get("type"): c for c in previous.get("conditions") or []}
    ready = _stamped(_condition(Kind.READY, False, Reason.INVALID_SPEC, message), conditions, generation, now)
    return {"phase": str(SessionPhase.FAILED), "observedGeneration": generation,
            "conditions": [ready, *(c for kind, c in conditions.items() if kind != str(Kind.READY))]}


def derive(observed: Observed, now: datetime) -> dict[str, Any]:
    """The full status object to write (conditions keep their lastTransitionTime when unchanged)."""
    spec = observed.spec
    # Suspension is read from the spec alone (the handler sets lifecycle.suspend for idleness first), so a
    # Suspended condition that is True always means the spec asked for it: see _resumed_at.
    suspended = spec.lifecycle.suspend
    if suspended_for_idleness(observed):
        # The last activity known, not idle_since: that one moves when this pass resumes (it would not stay).
        moments = [last_activity(observed), parse_time(observed.previous.get("readyAt")), observed.created]
        since = max(moment for moment in moments if moment is not None)
        timeout = f" (idleTimeout {spec.lifecycle.idle_timeout})" if spec.lifecycle.idle_timeout else ""
        suspension = (Reason.IDLE_TIMEOUT_REACHED,
                      f"no activity since {format_time(since)}{timeout}: pod deleted, workspace kept; "
                      "a message through the API resumes it")
    else:
        suspension = (Reason.SUSPENDED_BY_USER, "suspended: pod deleted, workspace kept")
    expired = expiry(observed, now)
    wants_pod = not (suspended or expired or observed.deleting or observed.conflict)
    pod = observed.pod
    claim_phase = ((observed.pvc or {}).get("status") or {}).get("phase")
    workspace = _workspace_condition(claim_phase, observed.claim_refused)
    claim_pending = observed.pvc is not None and claim_phase not in ("Bound", "Lost")
    scheduled = _scheduled_condition(pod, wants_pod, claim_pending)
    failure = pod_failure(pod) if pod is not None and wants_pod else None
    if failure is None and scheduled["reason"] == Reason.UNSCHEDULABLE:
        failure = (Reason.UNSCHEDULABLE, scheduled["message"])
    pod_ready = pod is not None and _pod_condition(pod, "Ready").get("status") == "True"

    if observed.deleting:
        phase, ready = SessionPhase.TERMINATING, _condition(Kind.READY, False, Reason.TERMINATING,
                                                            "the session is being deleted")
    elif observed.conflict:
        phase, ready = SessionPhase.FAILED, _condition(Kind.READY, False, Reason.NAME_CONFLICT,
                                                       observed.conflict)
    elif expired:
        phase, ready = SessionPhase.EXPIRED, _condition(Kind.READY, False, *expired)
    elif suspended:
        phase, ready = SessionPhase.SUSPENDED, _condition(Kind.READY, False, *suspension)
    elif observed.blocked:
        phase, ready = SessionPhase.FAILED, _condition(Kind.READY, False, *observed.blocked)
    elif failure:
        phase = FAILURE_PHASES.get(failure[0], SessionPhase.FAILED)
        ready = _condition(Kind.READY, False, *failure)
    elif pod_ready:
        phase, ready = SessionPhase.RUNNING, _condition(Kind.READY, True, Reason.SESSION_READY,
                                                        "the agent API is ready")
    elif pod is not None and scheduled["status"] == "True":
        phase, ready = SessionPhase.STARTING, _condition(Kind.READY, False, Reason.POD_STARTING,
                                                         "the sandbox pod is starting")
    else:
        phase, ready = SessionPhase.PENDING, _condition(Kind.READY, False, Reason.POD_STARTING,
                                                        scheduled["message"])

    suspended_condition = (
        _condition(Kind.SUSPENDED, True, *suspension)
        if suspended else _condition(Kind.SUSPENDED, False, Reason.NOT_SUSPENDED, "running as asked"))
    mcp = _mcp_condition(observed)
    previous_conditions = {c.get("type"): c for c in observed.previous.get("conditions") or []}
    if mcp is None:
        mcp = previous_conditions.get(str(Kind.MCP_READY)) or _condition(
            Kind.MCP_READY, None, Reason.SERVER_NOT_READY, "not checked yet")
    conditions = [_stamped(condition, previous_conditions, observed.generation, now)
                  for condition in (ready, scheduled, workspace, mcp, suspended_condition)]

    status: dict[str, Any] = {
        "phase": str(phase), "conditions": conditions, "observedGeneration": observed.generation,
        "podName": observed.child_name if pod is not None else None,
        "endpoint": naming.endpoint(observed.child_name, observed.namespace),
        "startedAt": (pod or {}).get("status", {}).get("startTime") or observed.previous.get("startedAt"),
        "readyAt": observed.previous.get("readyAt") or (format_time(now) if pod_ready else None),
        "poolMember": observed.annotations.get(naming.POOL_MEMBER_ANNOTATION),
    }
    activity = last_activity(observed)
    status["lastActivityTime"] = format_time(activity) if activity else None
    return status
