"""ClusterAgentSessionPool without a cluster: which namespaces it selects, and the pool it keeps in each."""

import pytest

from agentbox.crds.clusteragentsessionpool import ClusterAgentSessionPoolSpec, NamespaceSelector
from agentbox.operator import naming
from agentbox.operator.build.pool import kept_pool, namespace_selector
from agentbox.operator.handlers.cluster_pool import serves

CLUSTER_POOL = {"metadata": {"name": "claude", "uid": "cluster-uid", "generation": 3}}


@pytest.mark.parametrize(("selector", "query"), [
    ({}, "agentbox.dev/tenant"),
    ({"matchLabels": {"tier": "gold", "region": "eu"}}, "agentbox.dev/tenant,region=eu,tier=gold"),
    ({"matchExpressions": [{"key": "agentbox.dev/tenant", "operator": "In", "values": ["acme", "globex"]},
                           {"key": "tier", "operator": "NotIn", "values": ["free"]},
                           {"key": "beta", "operator": "Exists"},
                           {"key": "frozen", "operator": "DoesNotExist"}]},
     "agentbox.dev/tenant,agentbox.dev/tenant in (acme,globex),tier notin (free),beta,!frozen"),
])
def test_the_selector_always_requires_the_tenant_label(selector, query):
    assert namespace_selector(NamespaceSelector.model_validate(selector)) == query


def test_the_kept_pool_is_the_cluster_pools_spec_owned_by_it():
    spec = ClusterAgentSessionPoolSpec.model_validate(
        {"replicas": 3, "template": {"agent": {"runtime": "gemini"}},
         "namespaceSelector": {"matchLabels": {"tier": "gold"}}})
    pool = kept_pool(CLUSTER_POOL, spec, "tenant-acme")
    assert pool["metadata"]["name"] == "claude" and pool["metadata"]["namespace"] == "tenant-acme"
    assert pool["metadata"]["labels"] == {naming.MANAGED_BY: naming.MANAGER,
                                          naming.CLUSTER_POOL_LABEL: "claude"}
    [owner] = pool["metadata"]["ownerReferences"]
    assert owner["uid"] == "cluster-uid" and owner["controller"]
    assert owner["kind"] == "ClusterAgentSessionPool"
    assert pool["spec"]["replicas"] == 3 and pool["spec"]["template"]["agent"]["runtime"] == "gemini"
    assert "namespaceSelector" not in pool["spec"]


@pytest.mark.parametrize(("patterns", "namespace", "served"), [
    ((), "tenant-acme", True),
    (("tenant-*",), "tenant-acme", True),
    (("t-op-*",), "tenant-acme", False),
    (("tenant-*", "!tenant-test-*"), "tenant-test-1", False),
    (("tenant-*,!tenant-test-*",), "tenant-acme", True),
    (("!kube-*",), "tenant-acme", True),
    (("!kube-*",), "kube-system", False),
])
def test_a_cluster_pool_keeps_pools_only_where_the_operator_serves(patterns, namespace, served):
    assert serves(patterns, namespace) is served
