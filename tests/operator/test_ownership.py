"""The ownership check behind every write: ours, adoptable, or someone else's (never overwritten)."""

import pytest

from agentbox.operator.kube import Ownership, classify, resource_path

LABELS = {
    "app.kubernetes.io/managed-by": "agentbox",
    "agentbox.dev/session": "s1",
    "agentbox.dev/org": "acme",
}


def obj(labels=None, owners=None):
    return {"metadata": {"labels": labels or {}, "ownerReferences": owners or []}}


def owner(uid, controller=True):
    return {"kind": "AgentSession", "name": "s1", "uid": uid, "controller": controller}


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        (None, Ownership.ABSENT),
        (obj(LABELS, [owner("u1")]), Ownership.OURS),
        (obj({}, [owner("u1")]), Ownership.OURS),  # the controller reference decides, labels may be edited
        (obj(LABELS, [owner("u2")]), Ownership.FOREIGN),  # a previous session of the same name
        (
            obj(LABELS, [{"kind": "Deployment", "name": "x", "uid": "d1", "controller": True}]),
            Ownership.FOREIGN,
        ),
        (obj(LABELS), Ownership.ADOPTABLE),
        (obj(LABELS, [owner("u2", controller=False)]), Ownership.ADOPTABLE),
        (obj({}), Ownership.FOREIGN),
        (obj({**LABELS, "agentbox.dev/session": "other"}), Ownership.FOREIGN),
    ],
)
def test_classify_children(existing, expected):
    assert classify(existing, "u1", LABELS) is expected


def test_classify_label_owned_baseline():
    baseline = {"app.kubernetes.io/managed-by": "agentbox"}
    assert classify(obj(baseline), None, baseline) is Ownership.OURS
    assert classify(obj({}), None, baseline) is Ownership.FOREIGN
    assert classify(obj(baseline, [owner("x")]), None, baseline) is Ownership.FOREIGN


def test_resource_paths():
    assert resource_path("Pod", "ns", "p") == "/api/v1/namespaces/ns/pods/p"
    assert resource_path("Namespace", None, "ns") == "/api/v1/namespaces/ns"
    assert resource_path("AgentSession", "ns", "s", "status") == (
        "/apis/agentbox.dev/v1alpha1/namespaces/ns/agentsessions/s/status"
    )
    assert resource_path("NetworkPolicy", "ns") == "/apis/networking.k8s.io/v1/namespaces/ns/networkpolicies"
