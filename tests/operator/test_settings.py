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
