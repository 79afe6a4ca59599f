"""The OpenAPI document declares the problems the routes do answer (the schemathesis run holds answers to
the document; this holds the document to what the code can answer)."""

from __future__ import annotations

import pytest

from agentbox.api.app import create_app
from agentbox.api.settings import Settings

SPEC = create_app(Settings()).openapi()
# Routes that call Kubernetes answer kube_problem's 502 (the control plane refused) and 409 (a conflict,
# an org never provisioned); the OAuth calls with a body answer 400 (not JSON) and 413 (too large).
DECLARED = {
    ("post", "/api/v1/sessions"): {"409", "502", "503"},
    ("get", "/api/v1/sessions"): {"409", "502", "503"},
    ("get", "/api/v1/sessions/{name}"): {"409", "502", "503"},
    ("delete", "/api/v1/sessions/{name}"): {"409", "502", "503"},
    ("post", "/api/v1/sessions/{name}/suspend"): {"409", "502", "503"},
    ("post", "/api/v1/sessions/{name}/resume"): {"409", "502", "503"},
    ("post", "/api/v1/mcp/oauth/init"): {"400", "413"},
    ("post", "/api/v1/mcp/oauth/refresh"): {"400", "413"},
    ("post", "/api/v1/mcp/oauth/revoke"): {"400", "409", "413", "502"},
    ("get", "/api/v1/mcp/oauth/callback"): {"502"},
}


@pytest.mark.parametrize(("method", "path"), sorted(DECLARED))
def test_the_problems_a_route_answers_are_declared(method, path):
    responses = SPEC["paths"][path][method]["responses"]
    assert DECLARED[(method, path)] <= set(responses), sorted(responses)
    for status in DECLARED[(method, path)]:
        assert "application/problem+json" in responses[status]["content"]


def test_every_route_with_a_body_declares_its_refusals():
    for path, operations in SPEC["paths"].items():
        for method, operation in operations.items():
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= set(operation["responses"]), (method, path)
