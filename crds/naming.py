"""Names and labels both the operator and the API rely on: how a session's children are named and
labelled, and which keys they carry. One home, so the API can find what the operator made by name."""

import hashlib
import re

MAX_NAME = 63
HASH_LENGTH = 8

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "agentbox"
SESSION_LABEL = "agentbox.dev/session"
ORG_LABEL = "agentbox.dev/org"
USER_LABEL = "agentbox.dev/user"
TENANT_LABEL = "agentbox.dev/tenant"
RESERVED_PREFIX = "agentbox.dev/"
LAST_ACTIVITY_ANNOTATION = "agentbox.dev/last-activity"
# Set by the operator beside spec.lifecycle.suspend when it suspends an idle session: such a session resumes
# on its next message, one a user suspended does not. Its value is the reason (IdleTimeoutReached).
SUSPEND_REASON_ANNOTATION = "agentbox.dev/suspend-reason"
# The id of the API request that last changed the session (its audit row carries the same id): the
# operator repeats it in the Events and log lines that follow from the change.
REQUEST_ID_ANNOTATION = "agentbox.dev/request-id"
# Set by the API on an MCPServer whose OAuth grant no longer holds (value NEEDS_REAUTH); the operator then
# keeps the server's Authorized condition False.
OAUTH_ANNOTATION = "agentbox.dev/oauth"
NEEDS_REAUTH = "needs-reauth"
# Warm pools (AgentSessionPool): a member's pod, claim, ConfigMap and Secret carry POOL_LABEL (the pool's
# name) and TEMPLATE_HASH_LABEL (template_hash of its pod) until a session claims them; the claimed pod keeps
# CLAIMED_FROM_LABEL. The session names its member in POOL_MEMBER_ANNOTATION: its children's name from then.
POOL_LABEL = "agentbox.dev/pool"
TEMPLATE_HASH_LABEL = "agentbox.dev/template-hash"
CLAIMED_FROM_LABEL = "agentbox.dev/claimed-from"
POOL_MEMBER_ANNOTATION = "agentbox.dev/pool-member"
# A pool member's runner token starts so: its runner waits for the token its session's claim writes, and no
# session keeps it.
POOL_TOKEN_PREFIX = "pool-"  # noqa: S105 (a prefix, not a token)
RUNNER_TOKEN_KEY = "runner-token"  # noqa: S105 (a key and file name in the session's Secret)


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:HASH_LENGTH]


def slug(text: str) -> str:
    """Lower-case letters, digits and single dashes; may be empty."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", text.lower())).strip("-")


def child_name(session_name: str) -> str:
    """Name of every child of a session: a readable prefix plus a hash of the full name.

    The hash keeps two sessions whose names truncate or slug alike apart, and the result is a valid
    DNS label (Services need one) of at most 54 characters.
    """
    prefix = slug(session_name)[: MAX_NAME - HASH_LENGTH - 10].rstrip("-") or "session"
    return f"{prefix}-{short_hash(session_name)}"


def session_child_name(session_name: str, annotations: dict[str, str] | None) -> str:
    """The name of a session's children: its pool member's when it claimed one, else child_name."""
    return (annotations or {}).get(POOL_MEMBER_ANNOTATION) or child_name(session_name)


def label_value(text: str) -> str:
    """Any string as a label value: itself when already valid, else a slug plus a hash."""
    if len(text) <= MAX_NAME and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", text):
        return text
    prefix = slug(text)[: MAX_NAME - HASH_LENGTH - 1].rstrip("-")
    return f"{prefix}-{short_hash(text)}" if prefix else short_hash(text)
