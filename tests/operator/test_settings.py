"""kopf's tuning: the lean essence kopf's change detection compares."""

import threading

import kopf
import pytest

from agentbox.operator.settings import ANNOTATION_PREFIX, LeanDiffBaseStorage

KEY = "last-handled-configuration"


def session_body(**extra_metadata) -> dict:
    return {
        "apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
        "metadata": {
            "name": "s", "namespace": "t-acme", "uid": "u-1", "resourceVersion": "7", "generation": 2,
            "labels": {"team": "a"},
            "annotations": {f"{ANNOTATION_PREFIX}/{KEY}": '{"spec":{}}', "note": "kept",
                            "kubectl.kubernetes.io/last-applied-configuration": "{}"},
            "ownerReferences": [{"kind": "Thing", "name": "t", "uid": "u-0"}],
            **extra_metadata,
        },
        "spec": {"tenant": {"org": "acme", "user": "ada"}, "agent": {"runtime": "scripted"}},
        "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
    }


@pytest.mark.parametrize("body", [
    session_body(),
    session_body(managedFields=[{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]),
    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "t-acme"}},
    {"kind": "Thing", "metadata": {"name": "bare"}, "data": {"a": "1"}},
])
def test_the_lean_essence_is_kopfs_own(body):
    lean = LeanDiffBaseStorage(prefix=ANNOTATION_PREFIX, key=KEY)
    full = kopf.AnnotationsDiffBaseStorage(prefix=ANNOTATION_PREFIX, key=KEY)
    assert lean.build(body=kopf.Body(body)) == full.build(body=kopf.Body(body))


def test_the_lean_essence_never_copies_managed_fields_or_status():
    body = session_body(managedFields=[{"uncopyable": threading.Lock()}])
    body["status"]["uncopyable"] = threading.Lock()
    essence = LeanDiffBaseStorage(prefix=ANNOTATION_PREFIX, key=KEY).build(body=kopf.Body(body))
    assert essence == {"spec": body["spec"], "metadata": {"labels": {"team": "a"},
                                                          "annotations": {"note": "kept"}}}
