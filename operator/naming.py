"""Deterministic, collision-safe names and label values for everything a session becomes."""

import hashlib
import re

MAX_NAME = 63
HASH_LENGTH = 8
ENDPOINT_PORT = 3284

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "agentbox"
SESSION_LABEL = "agentbox.dev/session"
ORG_LABEL = "agentbox.dev/org"
TENANT_LABEL = "agentbox.dev/tenant"
RESERVED_PREFIX = "agentbox.dev/"
CONFIG_HASH_ANNOTATION = "agentbox.dev/config-hash"
LAST_ACTIVITY_ANNOTATION = "agentbox.dev/last-activity"


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


def label_value(text: str) -> str:
    """Any string as a label value: itself when already valid, else a slug plus a hash."""
    if len(text) <= MAX_NAME and re.fullmatch(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?", text):
        return text
    prefix = slug(text)[: MAX_NAME - HASH_LENGTH - 1].rstrip("-")
    return f"{prefix}-{short_hash(text)}" if prefix else short_hash(text)


def tenant_namespace(org: str) -> str:
    return f"tenant-{org}"


def session_labels(session_name: str, org: str) -> dict[str, str]:
    return {MANAGED_BY: MANAGER, SESSION_LABEL: label_value(session_name), ORG_LABEL: label_value(org)}


def credential_key(server: str, what: str) -> str:
    """The Secret key (and file name) of one MCP credential, e.g. mcp-github-token."""
    return f"mcp-{server}-{slug(what)}"


def env_credential_key(server: str, variable: str) -> str:
    """The Secret key of a stdio server's secret variable: the name kept as is (a valid key already), so
    FOO_BAR and FOO__BAR stay apart."""
    return f"mcp-{server}-env-{variable}"


def endpoint(session_name: str, namespace: str) -> str:
    return f"http://{child_name(session_name)}.{namespace}.svc:{ENDPOINT_PORT}"
