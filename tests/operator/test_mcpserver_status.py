"""The MCPServer status the operator writes keeps the conditions it does not own (pure, no cluster)."""

from agentbox.crds.conditions import MCPServerPhase, Reason
from agentbox.operator.handlers.mcpserver import _status

AUTHORIZED_BY_API = {"type": "Authorized", "status": "False", "reason": "NeedsReauthorization",
                     "message": "invalid_grant", "lastTransitionTime": "2026-01-01T00:00:00Z"}


def ready(status):
    return [c for c in status["conditions"] if c["type"] == "Ready"]


def test_a_probe_keeps_the_apis_authorized_condition():
    previous = {"phase": "Ready", "conditions": [
        {"type": "Ready", "status": "True", "reason": "ProbeSucceeded", "lastTransitionTime": "t0"},
        AUTHORIZED_BY_API]}
    status = _status(MCPServerPhase.UNREACHABLE, Reason.PROBE_FAILED, "down", 3, previous, None, probed=True,
                     annotations={"agentbox.dev/oauth": "needs-reauth"})
    assert AUTHORIZED_BY_API in status["conditions"]
    (condition,) = ready(status)
    assert condition["status"] == "False" and condition["reason"] == "ProbeFailed"
    assert len(status["conditions"]) == 2


def test_the_needs_reauth_annotation_brings_the_condition_back_when_the_apis_write_was_lost():
    status = _status(MCPServerPhase.READY, Reason.PROBE_SUCCEEDED, "1 tool(s)", 1, {}, [], probed=True,
                     annotations={"agentbox.dev/oauth": "needs-reauth"})
    (authorized,) = [c for c in status["conditions"] if c["type"] == "Authorized"]
    assert authorized["status"] == "False" and authorized["reason"] == "NeedsReauthorization"


def test_without_oauth_trouble_only_ready_is_written():
    status = _status(MCPServerPhase.READY, Reason.PROBE_SUCCEEDED, "1 tool(s)", 1, {}, [], probed=True)
    assert [c["type"] for c in status["conditions"]] == ["Ready"]
    reauthorized = {**AUTHORIZED_BY_API, "status": "True", "reason": "Authorized"}
    kept = _status(MCPServerPhase.READY, Reason.PROBE_SUCCEEDED, "1 tool(s)", 1,
                   {"conditions": [reauthorized]}, [], probed=True, annotations={})
    assert reauthorized in kept["conditions"]
