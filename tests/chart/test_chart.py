"""The Helm chart: lint, the values schema, install and uninstall on the local cluster, and its RBAC.

The RBAC tests run the operator as a local process authenticated as the chart's operator ServiceAccount
(a TokenRequest token, authorization on), and the API's Kubernetes client as the chart's API ServiceAccount,
so "enough" and "not more than needed" are both shown for real.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
import yaml
from e2e.stack import REPO, Process, chart_identity, delete_tenant, operator_process, tools_for
from fixtures.cluster import TEST_NAMESPACE_LABEL, KubectlError
from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.api.audit_checkpoints import load_signing_key
from agentbox.api.kube import Kube as ApiKube
from agentbox.api.kube import KubeError, tenant_namespace
from agentbox.operator.settings import OperatorSettings

pytestmark = [pytest.mark.cluster, pytest.mark.e2e]  # `make e2e` runs the chart's tests too

CHART = REPO / "charts" / "agentbox"
REQUIRED = ["--set", "jwt.issuer=https://auth.example.test/auth/v1",
            "--set", "jwt.jwksUrl=https://auth.example.test/auth/v1/.well-known/jwks.json",
            "--set", "database.url=postgresql://agentbox_app@db.example.test/agentbox"]


async def helm(kube, *args: str) -> str:
    tools = tools_for(kube)
    return await tools.run(tools.helm, "--kubeconfig", kube.kubeconfig, *args)


async def helm_fails(kube, *args: str) -> str:
    with pytest.raises(chart_identity.ToolError) as failure:
        await helm(kube, *args)
    return str(failure.value)


def documents(rendered: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


async def test_lint_passes_with_the_required_values(kube):
    output = await helm(kube, "lint", str(CHART), "--strict", *REQUIRED)
    assert "0 chart(s) failed" in output


async def test_template_renders_restricted_pods_and_rbac_without_wildcards(kube):
    objects = documents(await helm(kube, "template", "abx", str(CHART), "--namespace", "abx-system",
                                   "--include-crds", *REQUIRED))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for expected in [("Deployment", "abx-agentbox-operator"), ("Deployment", "abx-agentbox-api"),
                     ("Service", "abx-agentbox-api"), ("ServiceAccount", "abx-agentbox-operator"),
                     ("ClusterRole", "abx-agentbox-api"), ("PodDisruptionBudget", "abx-agentbox-api"),
                     ("NetworkPolicy", "abx-agentbox-api"), ("Job", "abx-agentbox-migrate-1"),
                     ("CustomResourceDefinition", "agentsessions.agentbox.dev"),
                     ("CustomResourceDefinition", "mcpservers.agentbox.dev"),
                     ("CustomResourceDefinition", "agentsessionpools.agentbox.dev"),
                     ("CustomResourceDefinition", "clusteragentsessionpools.agentbox.dev"),
                     ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev")]:
        assert expected in kinds
    operator = next(o for o in objects if o["kind"] == "Deployment" and "operator" in o["metadata"]["name"])
    assert operator["spec"]["replicas"] == 2
    pod = operator["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = pod["containers"][0]
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["livenessProbe"] and container["resources"]["limits"]
    for role in (o for o in objects if o["kind"] in ("ClusterRole", "Role")):
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule.get("apiGroups", []), role["metadata"]
            assert not any(resource.startswith("pods/") for resource in rule["resources"]), rule


async def test_only_an_api_outside_the_cluster_may_port_forward(kube):
    def api_objects(rendered: str) -> tuple[list[dict], list[dict]]:
        objects = {(o["kind"], o["metadata"]["name"]): o for o in documents(rendered)}
        container = objects["Deployment", "abx-agentbox-api"]["spec"]["template"]["spec"]["containers"][0]
        return objects["ClusterRole", "abx-agentbox-api-tenant"]["rules"], container["env"]

    in_cluster_rules, in_cluster_env = api_objects(await helm(kube, "template", "abx", str(CHART), *REQUIRED))
    assert {"name": "AGENTBOX_RUNNER_TRANSPORT", "value": "service"} in in_cluster_env
    outside_rules, outside_env = api_objects(await helm(kube, "template", "abx", str(CHART), *REQUIRED,
                                                        "--set", "api.runnerTransport=port-forward"))
    assert {"name": "AGENTBOX_RUNNER_TRANSPORT", "value": "port-forward"} in outside_env
    assert [rule for rule in outside_rules if rule not in in_cluster_rules] == [
        {"apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"]}]


async def test_oauth_settings_and_extra_env_reach_the_api(kube):
    rendered = documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED,
                                    "--set", "api.publicUrl=https://agentbox.example.test",
                                    "--set", "api.oauth.clientsSecret=oauth-clients",
                                    "--set", "api.oauth.strangerCallbackAuditPerMinute=30",
                                    "--set", "api.extraEnv[0].name=AGENTBOX_OAUTH_REFRESH_WINDOW_SECONDS",
                                    "--set-string", "api.extraEnv[0].value=600"))
    deployment = next(o for o in rendered
                      if o["kind"] == "Deployment" and o["metadata"]["name"] == "abx-agentbox-api")
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    for entry in [{"name": "AGENTBOX_PUBLIC_URL", "value": "https://agentbox.example.test"},
                  {"name": "AGENTBOX_OAUTH_CLIENTS",
                   "valueFrom": {"secretKeyRef": {"name": "oauth-clients", "key": "clients.json"}}},
                  {"name": "AGENTBOX_OAUTH_STRANGER_CALLBACK_AUDIT_PER_MINUTE", "value": "30"},
                  {"name": "AGENTBOX_OAUTH_REFRESH_WINDOW_SECONDS", "value": "600"}]:
        assert entry in env


def operator_env(objects: list[dict]) -> dict[str, str]:
    deployment = next(o for o in objects
                      if o["kind"] == "Deployment" and o["metadata"]["name"] == "abx-agentbox-operator")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {var["name"]: var.get("value") for var in container["env"]}


async def test_each_agent_runtime_s_image_reaches_the_operator(kube):
    defaults = operator_env(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED)))
    assert json.loads(defaults["AGENTBOX_AGENT_IMAGES"]) == OperatorSettings().agent_images
    assert defaults["AGENTBOX_SANDBOX_IMAGE"] == OperatorSettings().sandbox_image
    one = operator_env(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED,
                                            "--set", "sandbox.agentImages.gemini=registry.test/gemini:7")))
    assert json.loads(one["AGENTBOX_AGENT_IMAGES"]) == {**OperatorSettings().agent_images,
                                                        "gemini": "registry.test/gemini:7"}
    none = operator_env(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED,
                                             "--set", "sandbox.agentImages=null")))
    assert json.loads(none["AGENTBOX_AGENT_IMAGES"]) == {}, "every runtime in sandbox.image"


async def test_the_egress_allow_list_reaches_the_operator(kube):
    defaults = operator_env(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED)))
    assert json.loads(defaults["AGENTBOX_EGRESS_DEFAULT_ALLOW"]) == []
    listed = operator_env(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED, "--set-json",
                                               'sandbox.egressAllow=["registry.npmjs.org","*.pypi.org"]')))
    assert json.loads(listed["AGENTBOX_EGRESS_DEFAULT_ALLOW"]) == ["registry.npmjs.org", "*.pypi.org"]


async def test_placement_values_reach_sessions_and_every_pod_of_the_api(kube, monkeypatch):
    selector, tolerations = {"pool": "agents"}, [{"key": "dedicated", "operator": "Exists"}]
    defaults = operator_env(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED)))
    assert defaults["AGENTBOX_SESSION_NODE_SELECTOR"] == "{}"
    assert defaults["AGENTBOX_SESSION_TOLERATIONS"] == "[]"
    placement = [f"{prefix}.{key}={json.dumps(value)}" for prefix in ("sandbox", "api")
                 for key, value in (("nodeSelector", selector), ("tolerations", tolerations))]
    placed = documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED,
                                  *(arg for value in placement for arg in ("--set-json", value))))
    # The operator reads its environment as the chart wrote it.
    for name, value in operator_env(placed).items():
        if value is not None:  # None: set from the pod (valueFrom)
            monkeypatch.setenv(name, value)
    settings = OperatorSettings()
    assert (settings.session_node_selector, settings.session_tolerations) == (selector, tolerations)
    # The migration Job and the test pod run where the API does (on a tainted pool they would never start).
    pods = {o["metadata"]["name"]: o["spec"] if o["kind"] == "Pod" else o["spec"]["template"]["spec"]
            for o in placed if o["kind"] in ("Deployment", "Job", "Pod")}
    for name in ("abx-agentbox-api", "abx-agentbox-migrate-1", "abx-agentbox-test-api"):
        assert pods[name].get("nodeSelector") == selector, name
        assert pods[name].get("tolerations") == tolerations, name
    assert "nodeSelector" not in pods["abx-agentbox-operator"]


async def test_the_api_signs_audit_checkpoints_with_a_generated_key_the_database_never_sees(kube):
    def api_of(objects: list[dict]) -> tuple[dict, dict | None]:
        deployment = next(o for o in objects
                          if o["kind"] == "Deployment" and o["metadata"]["name"] == "abx-agentbox-api")
        secret = next((o for o in objects if o["kind"] == "Secret"
                       and o["metadata"]["name"] == "abx-agentbox-audit-checkpoint"), None)
        return deployment["spec"]["template"]["spec"], secret

    pod, secret = api_of(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED)))
    container = pod["containers"][0]
    assert {"name": "AGENTBOX_AUDIT_CHECKPOINT_SIGNING_KEY", "valueFrom": {"secretKeyRef": {
        "name": "abx-agentbox-audit-checkpoint", "key": "signing-key"}}} in container["env"]
    assert {"name": "AGENTBOX_AUDIT_CHECKPOINT_DIR", "value": "/var/lib/agentbox/audit-checkpoints"} \
        in container["env"]
    assert {"name": "audit-checkpoints", "mountPath": "/var/lib/agentbox/audit-checkpoints"} \
        in container["volumeMounts"]
    assert {"name": "audit-checkpoints", "emptyDir": {}} in pod["volumes"]
    assert secret["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    load_signing_key(base64.b64decode(secret["data"]["signing-key"]).decode())  # an Ed25519 key the API takes

    trusted = base64.b64encode(bytes(32)).decode()
    pod, secret = api_of(documents(await helm(
        kube, "template", "abx", str(CHART), *REQUIRED, "--set", "api.auditCheckpoints.existingSecret=mine",
        "--set", f"api.auditCheckpoints.trustedKeys[0]={trusted}",
        "--set", "api.auditCheckpoints.existingClaim=anchors")))
    env = pod["containers"][0]["env"]
    assert secret is None
    assert {"name": "AGENTBOX_AUDIT_CHECKPOINT_SIGNING_KEY", "valueFrom": {"secretKeyRef": {
        "name": "mine", "key": "signing-key"}}} in env
    assert {"name": "AGENTBOX_AUDIT_CHECKPOINT_TRUSTED_KEYS", "value": trusted} in env
    assert {"name": "audit-checkpoints", "persistentVolumeClaim": {"claimName": "anchors"}} in pod["volumes"]

    pod, secret = api_of(documents(await helm(kube, "template", "abx", str(CHART), *REQUIRED,
                                              "--set", "api.auditCheckpoints.enabled=false")))
    assert secret is None and not any("AUDIT_CHECKPOINT" in e["name"] for e in pod["containers"][0]["env"])
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]


Grant = tuple[str, str, str, str]  # (apiGroup, resource, verb, where: "cluster" or "tenant namespaces")


def grants_of(objects: list[dict], namespace: str, account: str) -> set[Grant]:
    """Everything a ServiceAccount may do under the rendered chart: through its bindings (cluster-wide or in
    one namespace), and through the role the operator binds to it in each tenant namespace."""
    roles = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("ClusterRole", "Role")}
    subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
    granted: list[tuple[dict, str]] = []
    for binding in (o for o in objects if o["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        if subject in binding["subjects"]:
            where = "cluster" if binding["kind"] == "ClusterRoleBinding" else binding["metadata"]["namespace"]
            granted.append((roles[binding["roleRef"]["kind"], binding["roleRef"]["name"]], where))
    operator = next(o for o in objects
                    if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator"))
    env = {e["name"]: e for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]}
    if env.get("AGENTBOX_API_SERVICE_ACCOUNT", {}).get("value") == account:
        assert env["AGENTBOX_API_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
        granted.append((roles["ClusterRole", env["AGENTBOX_API_TENANT_ROLE"]["value"]], "tenant namespaces"))
    grants = set()
    for role, where in granted:
        for rule in role["rules"]:
            assert "resourceNames" not in rule, rule  # none here: the set below would overstate a grant
            grants |= {(group, resource, verb, where) for group in rule["apiGroups"]
                       for resource in rule["resources"] for verb in rule["verbs"]}
    return grants


def grant(group: str, resources: str, verbs: str, where: str) -> set[Grant]:
    return {(group, resource, verb, where) for resource in resources.split() for verb in verbs.split()}


# What the API does (api/kube.py, api/watch_cache.py, api/routers/oauth.py, api/portforward.py), and where.
API_GRANTS = (grant("", "namespaces", "get create", "cluster")  # onboarding an org
              | grant("agentbox.dev", "agentsessions mcpservers", "list watch", "cluster")  # the read caches
              | grant("agentbox.dev", "agentsessions", "get create patch delete", "tenant namespaces")
              | grant("agentbox.dev", "mcpservers", "get create update patch delete", "tenant namespaces")
              | grant("agentbox.dev", "mcpservers/status", "patch", "tenant namespaces")
              | grant("", "secrets", "get create update delete", "tenant namespaces"))
PORT_FORWARD_GRANTS = grant("", "pods/portforward", "get create", "tenant namespaces")


@pytest.mark.parametrize(("values", "expected"), [([], API_GRANTS),
                                                  (["--set", "api.runnerTransport=port-forward"],
                                                   API_GRANTS | PORT_FORWARD_GRANTS)])
async def test_the_api_is_granted_exactly_what_it_uses(kube, values, expected):
    objects = documents(await helm(kube, "template", "abx", str(CHART), "--namespace", "abx-system",
                                   *REQUIRED, *values))
    assert grants_of(objects, "abx-system", "abx-agentbox-api") == expected
    # The operator binds that role and no other.
    operator_role = next(o for o in objects
                         if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "abx-agentbox-operator")
    assert [rule for rule in operator_role["rules"] if "bind" in rule["verbs"]] == [
        {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"], "verbs": ["bind"],
         "resourceNames": ["abx-agentbox-api-tenant"]}]


@pytest.mark.parametrize(("values", "named"), [
    (["--set", "operator.replicas=0"], "at '/operator/replicas'"),
    (["--set", "operator.peeringLifetimeSeconds=2"], "at '/operator/peeringLifetimeSeconds'"),
    (["--set", "api.service.type=Sideways"], "at '/api/service/type'"),
    (["--set", "jwt.issuer=not-a-url"], "at '/jwt/issuer'"),
    (["--set", "database.url=mysql://x/y"], "at '/database/url'"),
    (["--set", "image.pullPolicy=Sometimes"], "at '/image/pullPolicy'"),
    (["--set", "operator.resources.limits.memory=lots"], "at '/operator/resources/limits/memory'"),
    (["--set", "serviceMonitor.interval=often"], "at '/serviceMonitor/interval'"),
    (["--set", "operatr.replicas=2"], "'operatr' not allowed"),
    (["--set-json", "api.port=\"8000\""], "at '/api/port'"),
    (["--set", "api.runnerTransport=ssh"], "at '/api/runnerTransport'"),
    (["--set", "api.publicUrl=agentbox.example.test"], "at '/api/publicUrl'"),
    (["--set", "api.extraEnv[0].name=PATH", "--set", "api.extraEnv[0].value=/tmp"],
     "at '/api/extraEnv/0/name'"),
    (["--set", "api.auditCheckpoints.trustedKeys[0]=not-a-key"], "at '/api/auditCheckpoints/trustedKeys/0'"),
    (["--set", "api.auditCheckpoints.intervalSeconds=0"], "at '/api/auditCheckpoints/intervalSeconds'"),
    (["--set", "sandbox.agentImages.gemni=x"], "at '/sandbox/agentImages': additional properties 'gemni'"),
    (["--set", "sandbox.agentImages.codex="], "at '/sandbox/agentImages/codex'"),
    (["--set-json", 'sandbox.egressAllow=["https://x.org"]'], "at '/sandbox/egressAllow/0'"),
])
async def test_bad_values_fail_naming_the_field(kube, values, named):
    error = await helm_fails(kube, "template", "abx", str(CHART), *REQUIRED, *values)
    assert "values don't meet the specifications of the schema" in error
    assert named in error


@pytest.mark.parametrize(("values", "message"), [
    (["--set", "database.url=postgresql://x@h/d"], "jwt.issuer is required"),
    (["--set", "jwt.issuer=https://i.test"], "database.url (or database.existingSecret) is required"),
    ([*REQUIRED, "--set", "encryption.generate=false"], "encryption.existingSecret is required"),
    ([*REQUIRED, "--set", "api.ingress.enabled=true"], "api.ingress.host is required"),
])
async def test_missing_values_fail_with_the_next_step(kube, values, message):
    assert message in await helm_fails(kube, "template", "abx", str(CHART), *values)


async def namespaced_leftovers(kube, namespace: str) -> list[str]:
    listing = json.loads(await kube.kubectl(
        "get", "deployments,replicasets,pods,services,serviceaccounts,secrets,configmaps,jobs,"
        "poddisruptionbudgets,networkpolicies,roles,rolebindings", "-n", namespace, "-o", "json"))
    defaults = {("ServiceAccount", "default"), ("ConfigMap", "kube-root-ca.crt")}
    return sorted(f"{o['kind']}/{o['metadata']['name']}" for o in listing["items"]
                  if (o["kind"], o["metadata"]["name"]) not in defaults
                  and not o["metadata"].get("deletionTimestamp"))


async def test_install_then_uninstall_keeps_only_what_the_user_chose(kube, namespace):
    release = f"abx{secrets.token_hex(3)}"
    values = [*REQUIRED, "--set", f"operator.peeringName={release}"]
    await helm(kube, "install", release, str(CHART), "--namespace", namespace, *values)
    installed = await namespaced_leftovers(kube, namespace)
    for expected in [f"Deployment/{release}-agentbox-operator", f"Deployment/{release}-agentbox-api",
                     f"Service/{release}-agentbox-api", f"Secret/{release}-agentbox-encryption",
                     f"Secret/{release}-agentbox-database", f"Secret/{release}-agentbox-audit-checkpoint",
                     f"PodDisruptionBudget/{release}-agentbox-api",
                     f"NetworkPolicy/{release}-agentbox-operator"]:
        assert expected in installed
    cluster_scoped = ("clusterroles,clusterrolebindings,clusterkopfpeerings -l "
                      f"app.kubernetes.io/instance={release}")
    assert len((await kube.kubectl("get", *cluster_scoped.split(), "-o", "name")).split()) == 6

    # A second release in the same namespace is refused before it creates anything.
    error = await helm_fails(kube, "install", f"{release}b", str(CHART), "--namespace", namespace, *values)
    assert f'namespace {namespace} already has agentbox release "{release}"' in error
    assert await namespaced_leftovers(kube, namespace) == installed

    # A Secret the values name but the namespace lacks fails the upgrade, named, before anything changes.
    error = await helm_fails(kube, "upgrade", release, str(CHART), "--namespace", namespace, *values,
                             "--set", "database.existingSecret=no-such-secret")
    assert 'database.existingSecret: Secret "no-such-secret" not found' in error

    # An upgrade keeps the generated keys (losing the encryption key loses every stored credential; a new
    # audit checkpoint key would no longer verify the checkpoints signed before).
    kept = {f"{release}-agentbox-encryption": "{.data.keys}",
            f"{release}-agentbox-audit-checkpoint": "{.data.signing-key}"}

    async def kept_keys() -> dict[str, str]:
        return {name: await kube.kubectl("get", "secret", name, "-n", namespace, "-o", f"jsonpath={path}")
                for name, path in kept.items()}

    before = await kept_keys()
    assert all(before.values())
    await helm(kube, "upgrade", release, str(CHART), "--namespace", namespace, *values)
    assert await kept_keys() == before

    uninstalled = await helm(kube, "uninstall", release, "--namespace", namespace, "--wait")
    assert all(name in uninstalled for name in kept)  # helm says what it kept
    assert sorted(await namespaced_leftovers(kube, namespace)) == sorted(f"Secret/{name}" for name in kept)
    assert (await kube.kubectl("get", *cluster_scoped.split(), "-o", "name")).strip() == ""
    crds = await kube.kubectl("get", "crd", "-o", "name")
    assert "agentsessions.agentbox.dev" in crds and "mcpservers.agentbox.dev" in crds


# ---------------------------------------------------------------------------------------------- RBAC

RBAC_RELEASE = "abx-rbac"
RBAC_NAMESPACE = "abx-rbac-system"
OPERATOR_ACCOUNT = f"system:serviceaccount:{RBAC_NAMESPACE}:{RBAC_RELEASE}-agentbox-operator"
API_ACCOUNT = f"system:serviceaccount:{RBAC_NAMESPACE}:{RBAC_RELEASE}-agentbox-api"
RBAC_TENANT_PREFIX = "tenant-rbac"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chart_identities(kube, tmp_path_factory) -> dict[str, Path]:
    """The chart's ServiceAccounts and RBAC applied for release abx-rbac, with a token kubeconfig each."""
    return await chart_identity.write_identities(tools_for(kube), RBAC_RELEASE, RBAC_NAMESPACE,
                                                 tmp_path_factory.mktemp("identity"), duration="1h")


async def can(kube, account: str, *check: str) -> bool:
    """`kubectl auth can-i` as the account (answers on stdout, exits 1 for "no")."""
    process = await asyncio.create_subprocess_exec(
        str(kube.kubectl_path), "--kubeconfig", str(kube.kubeconfig), "auth", "can-i", "--as", account,
        *check,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await process.communicate()
    answer = stdout.decode().strip()
    assert answer in ("yes", "no"), stderr.decode()
    return answer == "yes"


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rbac_operator(kube, chart_identities, tmp_path_factory) -> AsyncIterator[Process]:
    """The operator as the chart runs it (its ServiceAccount and environment), serving tenant-rbac*. Like any
    operator of the chart it gives every tenant namespace its baseline, the API's RoleBinding included."""
    chart = await chart_identity.render_operator(tools_for(kube), RBAC_RELEASE, RBAC_NAMESPACE)
    log = tmp_path_factory.mktemp("rbac-operator") / "operator.log"
    async with operator_process(chart_identities["operator"], f"{RBAC_TENANT_PREFIX}*", log,
                                chart.env) as operator:
        yield operator


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api_kube(chart_identities) -> AsyncIterator[ApiKube]:
    """The API's own Kubernetes client, authenticated as the chart's API ServiceAccount."""
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(chart_identities["api"]),
                                  client_configuration=configuration)
    async with client.ApiClient(configuration) as api:
        yield ApiKube(api)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def rbac_tenant(kube, rbac_operator, api_kube) -> AsyncIterator[str]:
    """A tenant namespace onboarded as the API onboards an org: created under the API's account, then
    awaited until the operator has let the API in (what POST /api/v1/orgs waits for)."""
    org = f"{RBAC_TENANT_PREFIX.removeprefix('tenant-')}{secrets.token_hex(3)}"
    namespace = tenant_namespace(org)
    await api_kube.ensure_tenant_namespace(namespace, org)
    try:
        await kube.kubectl("label", "namespace", namespace, f"{TEST_NAMESPACE_LABEL}=true")
        started = time.monotonic()
        assert await api_kube.wait_for_tenant_access(namespace, 15), rbac_operator.tail(40)
        print(f"the API may work in a new tenant namespace after {time.monotonic() - started:.2f} s")
        yield namespace
    finally:
        await delete_tenant(kube, namespace)


TENANT = "<the tenant namespace>"


@pytest.mark.parametrize(("account", "check"), [
    (OPERATOR_ACCOUNT, ["list", "secrets", "--all-namespaces"]),
    (OPERATOR_ACCOUNT, ["delete", "namespaces"]),
    (OPERATOR_ACCOUNT, ["create", "namespaces"]),
    (OPERATOR_ACCOUNT, ["create", "clusterroles"]),
    (OPERATOR_ACCOUNT, ["create", "clusterrolebindings"]),
    (OPERATOR_ACCOUNT, ["bind", "clusterroles/cluster-admin"]),
    (OPERATOR_ACCOUNT, ["escalate", "clusterroles"]),
    (OPERATOR_ACCOUNT, ["create", "pods", "--subresource=exec", "-n", "default"]),
    (OPERATOR_ACCOUNT, ["create", "agentsessions.agentbox.dev", "-n", "default"]),
    (OPERATOR_ACCOUNT, ["update", "customresourcedefinitions"]),
    (OPERATOR_ACCOUNT, ["create", "serviceaccounts", "--subresource=token", "-n", "default"]),
    (API_ACCOUNT, ["get", "nodes"]),
    # In a tenant namespace: no pods of its own, no way into them but port-forward, no Secret listing.
    (API_ACCOUNT, ["create", "pods", "-n", TENANT]),
    (API_ACCOUNT, ["get", "pods", "-n", TENANT]),
    (API_ACCOUNT, ["create", "pods", "--subresource=exec", "-n", TENANT]),
    (API_ACCOUNT, ["create", "pods", "--subresource=attach", "-n", TENANT]),
    (API_ACCOUNT, ["patch", "agentsessions.agentbox.dev", "--subresource=status", "-n", TENANT]),
    (API_ACCOUNT, ["create", "rolebindings", "-n", TENANT]),
    (API_ACCOUNT, ["list", "secrets", "-n", TENANT]),
    # Anywhere else: no Secrets, no sessions, no port-forward; and no namespace may be changed or go.
    (API_ACCOUNT, ["get", "secrets", "-n", "kube-system"]),
    (API_ACCOUNT, ["create", "secrets", "-n", "default"]),
    (API_ACCOUNT, ["list", "secrets", "--all-namespaces"]),
    (API_ACCOUNT, ["create", "agentsessions.agentbox.dev", "-n", "default"]),
    (API_ACCOUNT, ["get", "pods", "--subresource=portforward", "-n", "kube-system"]),
    (API_ACCOUNT, ["delete", "namespaces"]),
    (API_ACCOUNT, ["patch", "namespaces"]),
])
async def test_the_chart_grants_no_more_than_needed(kube, rbac_tenant, account, check):
    assert not await can(kube, account, *(rbac_tenant if arg == TENANT else arg for arg in check))


async def test_the_accounts_can_do_their_daily_work(kube, rbac_tenant):
    assert await can(kube, OPERATOR_ACCOUNT, "create", "pods", "-n", rbac_tenant)
    assert await can(kube, OPERATOR_ACCOUNT, "patch", "agentsessions.agentbox.dev", "--subresource=status",
                     "-n", rbac_tenant)
    assert await can(kube, OPERATOR_ACCOUNT, "bind", f"clusterroles/{RBAC_RELEASE}-agentbox-api-tenant")
    assert await can(kube, API_ACCOUNT, "create", "agentsessions.agentbox.dev", "-n", rbac_tenant)
    for verb in ("get", "create", "update", "delete"):
        assert await can(kube, API_ACCOUNT, verb, "secrets", "-n", rbac_tenant)
    for verb in ("get", "create"):  # a websocket port-forward needs both
        assert await can(kube, API_ACCOUNT, verb, "pods", "--subresource=portforward", "-n", rbac_tenant)


async def test_the_api_keeps_credentials_in_tenant_namespaces_and_nowhere_else(kube, api_kube, rbac_tenant,
                                                                               namespace):
    # Its own flow in a tenant namespace: an MCP server's credentials written, replaced, read, removed.
    labels = {"agentbox.dev/mcp-configuration": "c1"}
    spec = {"transport": "streamable-http", "url": "http://127.0.0.1:9/mcp"}
    await api_kube.apply_mcp_server(rbac_tenant, "tools", spec, {"token": "one"}, labels)
    await api_kube.apply_secret(rbac_tenant, "tools", {"token": "two"}, labels)
    secret = await api_kube.get_secret(rbac_tenant, "tools")
    assert secret is not None and base64.b64decode(secret.data["token"]) == b"two"
    await api_kube.delete_mcp_server(rbac_tenant, "tools")
    assert await api_kube.get_secret(rbac_tenant, "tools") is None

    # Elsewhere (`namespace` is a plain one): refused, Secrets that exist included.
    await kube.kubectl("create", "secret", "generic", "planted", "-n", namespace, "--from-literal=key=value")
    for where, name in ((namespace, "planted"), ("kube-system", "planted")):
        with pytest.raises(KubeError) as refused:
            await api_kube.get_secret(where, name)
        assert refused.value.status == 403
    with pytest.raises(KubeError) as refused:
        await api_kube.apply_secret(namespace, "tools", {"token": "one"}, labels)
    assert refused.value.status == 403
    assert not await api_kube.wait_for_tenant_access(namespace, 0)
    # No namespace may go: neither a plain one nor a tenant's.
    for target in (namespace, rbac_tenant):
        with pytest.raises(ApiException) as refused:
            await api_kube.core.delete_namespace(target)
        assert refused.value.status == 403


@dataclass(frozen=True)
class OperatorRun:
    """What the operator, authenticated as the chart's ServiceAccount, made of one session."""

    ready: bool
    children: list[str]
    baseline: list[str]
    log: str


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def operator_run(kube, rbac_operator, rbac_tenant) -> OperatorRun:
    session = {"apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSession",
               "metadata": {"name": "s1", "namespace": rbac_tenant},
               "spec": {"tenant": {"org": rbac_tenant.removeprefix("tenant-"), "user": "ada@example.com"},
                        "agent": {"runtime": "scripted"}}}
    await kube.kubectl("apply", "-f", "-", input=json.dumps(session))
    try:
        await kube.kubectl("wait", "agentsession/s1", "-n", rbac_tenant, "--for=condition=Ready",
                           "--timeout=90s")
        ready = True
    except KubectlError:
        ready = False
    children = await kube.kubectl("get", "pods,pvc,services,configmaps,secrets,networkpolicies",
                                  "-n", rbac_tenant, "-l", "agentbox.dev/session=s1", "-o", "name")
    baseline = await kube.kubectl("get", "resourcequotas,limitranges,networkpolicies,rolebindings",
                                  "-n", rbac_tenant, "-o", "name")
    return OperatorRun(ready, children.split(), baseline.split(), rbac_operator.tail(400))


async def test_the_operator_under_the_charts_account_brings_a_session_to_ready(operator_run):
    assert operator_run.ready, operator_run.log
    kinds = {name.split("/")[0] for name in operator_run.children}
    assert {"pod", "persistentvolumeclaim", "service", "configmap", "secret",
            "networkpolicy.networking.k8s.io"} <= kinds, operator_run.children
    # The tenant baseline is the operator's too, the API's way in among it.
    assert any(name.startswith("resourcequota/") for name in operator_run.baseline), operator_run.baseline
    assert any(name.startswith("limitrange/") for name in operator_run.baseline), operator_run.baseline
    assert (f"rolebinding.rbac.authorization.k8s.io/{RBAC_RELEASE}-agentbox-api-tenant"
            in operator_run.baseline), operator_run.baseline


async def test_the_operator_is_refused_nothing_under_the_charts_account(operator_run):
    refused = [line for line in operator_run.log.splitlines() if "Forbidden" in line]
    assert not refused, refused[:3]
