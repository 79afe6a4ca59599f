"""The session Secret: the runner token, the MCP credentials and the provider key, each item mounted into
the one container that reads it (operator/build/pod.py)."""

import secrets
from typing import Any

from agentbox.crds.naming import RUNNER_TOKEN_KEY
from agentbox.operator.build.common import Session
from agentbox.operator.build.mcp import encode


def new_runner_token() -> str:
    return encode(secrets.token_urlsafe(32))


def build_secret(session: Session, runner_token: str, credentials: dict[str, str]) -> dict[str, Any]:
    """`runner_token` and `credentials` values are base64 already (as read from other Secrets)."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": session.metadata(),
            "data": {RUNNER_TOKEN_KEY: runner_token, **credentials}}
