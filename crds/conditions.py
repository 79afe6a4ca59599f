"""Condition types, phases and reasons: the stable vocabulary of every status the operator writes.

Reasons are part of the public contract (tools match on them), so they only ever gain members.
"""

from enum import StrEnum


class ConditionType(StrEnum):
    READY = "Ready"
    POD_SCHEDULED = "PodScheduled"
    WORKSPACE_READY = "WorkspaceReady"
    MCP_READY = "MCPReady"
    SUSPENDED = "Suspended"
    AUTHORIZED = "Authorized"  # MCPServer with OAuth: written by the API, kept by the operator


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class SessionPhase(StrEnum):
    PENDING = "Pending"
    STARTING = "Starting"
    RUNNING = "Running"
    NEEDS_AUTH = "NeedsAuth"  # the agent refuses to work without credentials the session does not give it
    SUSPENDED = "Suspended"
    EXPIRED = "Expired"
    FAILED = "Failed"
    TERMINATING = "Terminating"


class MCPServerPhase(StrEnum):
    PENDING = "Pending"
    READY = "Ready"
    UNREACHABLE = "Unreachable"
    INVALID = "Invalid"


class Reason(StrEnum):
    # Ready (session)
    SESSION_READY = "SessionReady"
    POD_STARTING = "PodStarting"
    POD_MISSING = "PodMissing"
    IMAGE_PULL_FAILED = "ImagePullFailed"
    CRASH_LOOP = "CrashLoopBackOff"
    CONTAINER_CONFIG_ERROR = "ContainerConfigError"
    POD_FAILED = "PodFailed"
    POD_REJECTED = "PodRejected"
    AGENT_NEEDS_AUTH = "AgentNeedsAuth"
    AGENT_FAILED = "AgentFailed"
    NAME_CONFLICT = "NameConflict"
    INVALID_SPEC = "InvalidSpec"
    RECONCILE_ERROR = "ReconcileError"
    PROVIDER_KEY_NOT_FOUND = "ProviderKeyNotFound"
    SHUTDOWN_TIME_REACHED = "ShutdownTimeReached"
    IDLE_TIMEOUT_REACHED = "IdleTimeoutReached"
    TERMINATING = "Terminating"
    # PodScheduled
    SCHEDULED = "Scheduled"
    UNSCHEDULABLE = "Unschedulable"
    SCHEDULING_PENDING = "SchedulingPending"
    WAITING_FOR_WORKSPACE = "WaitingForWorkspace"
    # WorkspaceReady
    CLAIM_BOUND = "ClaimBound"
    CLAIM_PENDING = "ClaimPending"
    CLAIM_LOST = "ClaimLost"
    CLAIM_UPDATE_REFUSED = "ClaimUpdateRefused"  # a resize the claim's StorageClass does not allow
    # MCPReady
    ALL_SERVERS_READY = "AllServersReady"
    NO_SERVERS = "NoServersReferenced"
    SERVER_NOT_FOUND = "MCPServerNotFound"
    SERVER_NOT_READY = "MCPServerNotReady"
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105 (a reason, not a password)
    # Suspended
    SUSPENDED_BY_USER = "SuspendedByUser"
    NOT_SUSPENDED = "NotSuspended"
    # MCPServer Ready
    PROBE_SUCCEEDED = "ProbeSucceeded"
    PROBE_FAILED = "ProbeFailed"
    ADDRESS_REFUSED = "AddressRefused"  # the URL's host resolves where the operator does not connect
    STDIO_NOT_PROBED = "StdioNotProbed"
    PROBE_PENDING = "ProbePending"
    # MCPServer Authorized
    NEEDS_REAUTHORIZATION = "NeedsReauthorization"
    # AgentSessionPool Ready
    MEMBERS_READY = "MembersReady"
    MEMBERS_STARTING = "MembersStarting"
    MEMBER_REJECTED = "MemberRejected"  # the apiserver refused a member (quota, admission)
    # ClusterAgentSessionPool Ready (and NameConflict: a namespace has a pool of that name of its own)
    POOLS_READY = "PoolsReady"
    POOLS_STARTING = "PoolsStarting"
    # AgentSession events
    POOL_MEMBER_CLAIMED = "PoolMemberClaimed"
