"""Which session changes call for a reconcile: the API's activity stamp alone does not."""

import copy

import kopf
import pytest

from agentbox.operator import naming
from agentbox.operator.handlers.session import beyond_activity
from agentbox.operator.settings import OperatorSettings, configure_kopf

STAMP = "2026-11-27T00:00:00Z"
BODY = {
    "apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
    "metadata": {"name": "s1", "namespace": "t1", "uid": "u-1", "resourceVersion": "7"},
    "spec": {"tenant": {"org": "acme", "user": "u1"}, "lifecycle": {"idleTimeout": "30m"}},
}


def changed(body, **metadata):
    body = copy.deepcopy(body)
    for key, values in metadata.items():
        body["metadata"].setdefault(key, {}).update(values)
    return body


def essence(body):
    """The handled state kopf compares, as the operator's own storage builds it."""
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorSettings())
    return settings.persistence.progress_storage.clear(
        essence=settings.persistence.diffbase_storage.build(body=kopf.Body(body)))


STAMPED = changed(BODY, annotations={naming.LAST_ACTIVITY_ANNOTATION: STAMP})
LATER = changed(STAMPED, annotations={naming.LAST_ACTIVITY_ANNOTATION: "2026-11-27T00:00:30Z"})


@pytest.mark.parametrize(("before", "after", "reconciled"), [
    (BODY, STAMPED, False),  # the first stamp: annotations appear where there were none
    (STAMPED, LATER, False),
    (changed(BODY, labels={"team": "a"}), changed(STAMPED, labels={"team": "a"}), False),
    (STAMPED, changed(LATER, annotations={naming.REQUEST_ID_ANNOTATION: "req-1"}), True),
    (STAMPED, changed(LATER, labels={"team": "a"}), True),
    (STAMPED, {**LATER, "spec": {**LATER["spec"], "lifecycle": {"suspend": True}}}, True),
    (STAMPED, changed(BODY, annotations={"example.com/note": "x"}), True),
])
def test_only_a_change_beyond_the_activity_stamp_is_reconciled(before, after, reconciled):
    assert beyond_activity(old=essence(before), new=essence(after), diff=()) is reconciled
