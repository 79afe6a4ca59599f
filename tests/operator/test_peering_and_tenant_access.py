"""The operator's pure layer for HA and for the API's way into tenant namespaces: peering priority and
lifetime, and the tenant RoleBinding (the real-cluster behaviour is in test_operator_ha.py and
tests/chart)."""

import kopf
import pytest
from pydantic import ValidationError

from agentbox.operator.__main__ import start_priority
from agentbox.operator.build import tenant
from agentbox.operator.settings import OperatorSettings, configure_kopf


def test_replicas_get_distinct_priorities_and_an_earlier_start_ranks_higher(monkeypatch):
    now = {"ns": 1_800_000_000_000_000_000}
    monkeypatch.setattr("agentbox.operator.__main__.time.time_ns", lambda: now["ns"])
    same_millisecond = {start_priority() for _ in range(20)}
    assert len(same_millisecond) > 1  # kopf pauses every replica that meets one of equal priority
    now["ns"] += 1_000_000  # a millisecond later
    assert start_priority() < min(same_millisecond)
    assert max(same_millisecond) < 0  # an explicit --priority of 0 or more outranks them all


def test_a_dead_replicas_record_expires_after_the_configured_lifetime(monkeypatch):
    settings = kopf.OperatorSettings()
    configure_kopf(settings, OperatorSettings())
    assert settings.peering.lifetime == 10  # kopf's own default, 60 s, kept a standby paused a minute
    monkeypatch.setenv("AGENTBOX_PEERING_LIFETIME_SECONDS", "30")
    configure_kopf(settings, OperatorSettings())
    assert settings.peering.lifetime == 30
    monkeypatch.setenv("AGENTBOX_PEERING_LIFETIME_SECONDS", "2")
    with pytest.raises(ValidationError, match="peering_lifetime_seconds"):
        OperatorSettings()


def test_the_api_binding_needs_both_its_account_and_its_role(monkeypatch):
    monkeypatch.setenv("AGENTBOX_API_SERVICE_ACCOUNT", "abx-agentbox-api")
    with pytest.raises(ValidationError, match="AGENTBOX_API_TENANT_ROLE"):
        OperatorSettings()
    monkeypatch.setenv("AGENTBOX_API_TENANT_ROLE", "abx-agentbox-api-tenant")
    assert OperatorSettings().api_tenant_role == "abx-agentbox-api-tenant"


def test_the_api_binding_grants_the_tenant_role_to_the_api_alone():
    binding = tenant.build_api_binding("tenant-acme", "abx-agentbox-api-tenant", "abx-agentbox-api", "abx")
    assert binding["metadata"] == {"name": "abx-agentbox-api-tenant", "namespace": "tenant-acme",
                                   "labels": {"app.kubernetes.io/managed-by": "agentbox"}}
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": "abx-agentbox-api-tenant"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "abx-agentbox-api", "namespace": "abx"}]
