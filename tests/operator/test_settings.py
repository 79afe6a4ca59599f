"""kopf's tuning follows the operator's own settings."""

import kopf

from agentbox.operator.settings import OperatorSettings, configure_kopf


def test_objects_reconciled_at_once_are_bounded_by_the_setting(monkeypatch):
    monkeypatch.setenv("AGENTBOX_CONCURRENT_OBJECTS", "7")
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorSettings())
    assert settings.queueing.worker_limit == 7
    configure_kopf(settings, OperatorSettings(concurrent_objects=64))
    assert settings.queueing.worker_limit == 64


def test_session_placement_comes_from_json_in_the_environment(monkeypatch):
    monkeypatch.setenv("AGENTBOX_SESSION_NODE_SELECTOR", '{"agentbox.dev/real-node": "true"}')
    monkeypatch.setenv("AGENTBOX_SESSION_TOLERATIONS",
                       '[{"key": "agentbox.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}]')
    settings = OperatorSettings()
    assert settings.session_node_selector == {"agentbox.dev/real-node": "true"}
    assert settings.session_tolerations == [{"key": "agentbox.dev/real-node", "operator": "Exists",
                                             "effect": "NoSchedule"}]


BODY = {
    "apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
    "metadata": {"name": "s1", "namespace": "t1", "uid": "u-1", "resourceVersion": "7", "generation": 2,
                 "labels": {"team": "a"},
                 "annotations": {"agentbox.dev/last-activity": "2026-11-27T00:00:00Z",
                                 "kubectl.kubernetes.io/last-applied-configuration": "{}",
                                 "operator.agentbox.dev/last-handled-configuration": '{"spec":{}}',
                                 "operator.agentbox.dev/session_changed": '{"retries":1}',
                                 "other.example/kopf-managed": "yes", "other.example/progress": "{}",
                                 "kopf.zalando.org/last-handled-configuration": "{}"},
                 "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {"f:agent": {}}}}]},
    "spec": {"tenant": {"org": "acme", "user": "u1"}, "mcpServers": [{"name": "github"}]},
    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True"}]},
}


def test_the_handled_state_is_kopfs_own_essence_kept_in_memory_until_the_object_goes():
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorSettings())
    handled, progress = settings.persistence.diffbase_storage, settings.persistence.progress_storage
    # What kopf itself makes of a body: its build, then its progress storage's clear.
    stock = kopf.AnnotationsDiffBaseStorage(prefix="operator.agentbox.dev", key="last-handled-configuration")
    stock_progress = kopf.AnnotationsProgressStorage(prefix="operator.agentbox.dev")
    body = kopf.Body(BODY)
    essence = progress.clear(essence=handled.build(body=body))
    assert essence == stock_progress.clear(essence=stock.build(body=body))
    assert essence == {"spec": BODY["spec"], "metadata": {
        "labels": {"team": "a"}, "annotations": {"agentbox.dev/last-activity": "2026-11-27T00:00:00Z"}}}
    # Fields a handler asks for explicitly still come along, as kopf would bring them.
    assert progress.clear(essence=handled.build(body=body, extra_fields=["status.phase"])) == (
        stock_progress.clear(essence=stock.build(body=body, extra_fields=["status.phase"])))

    patch = kopf.Patch()
    assert handled.fetch(body=body) is None  # never handled (or handled by an operator since restarted)
    handled.store(body=body, patch=patch, essence=essence)
    assert handled.fetch(body=body) == essence
    assert not patch  # nothing is written to the object
    handled.forget("u-1")
    assert handled.fetch(body=body) is None


def test_each_agent_runtime_has_its_runner_image_and_the_rest_the_sandbox_image(monkeypatch):
    settings = OperatorSettings()
    assert settings.runner_image("claude-code") == "ghcr.io/agentbox-dev/agent-claude-code:0.1.0"
    assert settings.runner_image("gemini") == "ghcr.io/agentbox-dev/agent-gemini:0.1.0"
    assert settings.runner_image("codex") == "ghcr.io/agentbox-dev/agent-codex:0.1.0"
    assert settings.runner_image("scripted") == settings.runner_image("custom") == settings.sandbox_image
    monkeypatch.setenv("AGENTBOX_AGENT_IMAGES", '{"gemini": "registry.local/gemini:7"}')
    monkeypatch.setenv("AGENTBOX_SANDBOX_IMAGE", "registry.local/sandbox:7")
    settings = OperatorSettings()
    assert settings.runner_image("gemini") == "registry.local/gemini:7"
    assert settings.runner_image("claude-code") == "registry.local/sandbox:7", "the map replaces the defaults"
