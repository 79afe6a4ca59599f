"""Which apiserver refusals a session reports, and which it leaves alone."""

import json

import pytest
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.operator.handlers.session import namespace_terminating


def refusal(status: int, reason: str | None, body: str | None = None) -> ApiException:
    error = ApiException(status=status, reason="Forbidden")
    causes = [{"reason": reason, "field": "metadata.namespace"}] if reason else []
    error.body = body if body is not None else json.dumps(
        {"kind": "Status", "status": "Failure", "message": "refused", "details": {"causes": causes}})
    return error


@pytest.mark.parametrize(("error", "terminating"), [
    (refusal(403, "NamespaceTerminating"), True),  # the namespace goes, and its sessions with it
    (refusal(403, None), False),  # quota, admission: the session says so
    (refusal(422, "NamespaceTerminating"), False),
    (refusal(403, None, body="not json"), False),
    (refusal(403, None, body="[]"), False),
])
def test_only_a_terminating_namespace_is_left_unreported(error, terminating):
    assert namespace_terminating(error) is terminating
