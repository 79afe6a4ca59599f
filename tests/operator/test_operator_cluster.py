"""The operator against the real local cluster (kwok: real apiserver, scheduler, GC; simulated kubelets)."""

import asyncio
import base64
import copy
import json
import secrets
from datetime import UTC, datetime, timedelta

import pytest
from fixtures.polling import eventually
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from operator_harness import mcpserver_manifest, session_in_phase, session_manifest

from agentbox.crds import agentsession, mcpserver
from agentbox.crds.agentsession import AgentSessionSpec
from agentbox.operator import naming
from agentbox.operator.build.common import Session
from agentbox.operator.build.pod import build_pod, config_hash
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY

pytestmark = pytest.mark.cluster
CHILDREN = ("ConfigMap", "Secret", "PersistentVolumeClaim", "Service", "NetworkPolicy", "Pod")


async def children(ops, namespace, name):
    child = naming.child_name(name)
    return {kind: await ops.get(kind, namespace, child) for kind in CHILDREN}


async def test_tenant_namespace_gets_its_baseline(operator, ops, tenant):
    async def baseline():
        namespace = await ops.get("Namespace", None, tenant)
        objects = [
            await ops.get(kind, tenant, name)
            for kind, name in (
                ("ResourceQuota", "agentbox-tenant-quota"),
                ("LimitRange", "agentbox-tenant-limits"),
                ("NetworkPolicy", "agentbox-default-deny"),
            )
        ]
        labels = namespace["metadata"].get("labels") or {}
        return all(objects) and labels.get("pod-security.kubernetes.io/enforce") == "restricted" and objects

    quota, _limits, deny = await eventually(baseline)
    assert quota["spec"]["hard"]["pods"] == "50"
    assert deny["spec"]["podSelector"] == {} and deny["spec"]["policyTypes"] == ["Ingress", "Egress"]


async def test_session_becomes_ready_with_every_child(operator, ops, tenant):
    await ops.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "gh", "namespace": tenant},
            "data": {"token": base64.b64encode(b"s3cret").decode()},
        }
    )
    await ops.create(
        mcpserver_manifest(
            "files",
            tenant,
            transport="stdio",
            stdio={"command": "npx", "args": ["fs"]},
            auth={"type": "bearer", "secretRef": {"name": "gh", "key": "token"}},
        )
    )
    await ops.create(
        session_manifest("ready", tenant, mcpServers=[{"name": "files"}], systemPrompt="be kind")
    )
    await session_in_phase(ops, tenant, "ready", "Running")
    expected = {"Ready": "True", "PodScheduled": "True", "WorkspaceReady": "True", "MCPReady": "True",
                "Suspended": "False"}

    async def settled():
        # The session may start before its server's first check is done: MCPReady follows the server.
        body = await ops.get(agentsession.KIND, tenant, "ready")
        conditions = {c["type"]: c["status"] for c in body["status"]["conditions"]}
        return body if conditions == expected else None

    body = await eventually(settled, what="every condition of the session as expected")
    status = body["status"]
    assert status["observedGeneration"] == body["metadata"]["generation"]
    assert status["endpoint"] == f"http://{naming.child_name('ready')}.{tenant}.svc:3284"
    assert status["startedAt"] and status["readyAt"] and status["podName"] == naming.child_name("ready")

    found = await children(ops, tenant, "ready")
    for kind, child in found.items():
        assert child is not None, kind
        (owner,) = child["metadata"]["ownerReferences"]
        assert owner["uid"] == body["metadata"]["uid"] and owner["controller"] is True, kind
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "agentbox", kind
    gateway = json.loads(found["ConfigMap"]["data"]["gateway.json"])
    assert [upstream["name"] for upstream in gateway["upstreams"]] == ["files"]
    assert "s3cret" not in json.dumps(found["ConfigMap"])
    assert found["ConfigMap"]["data"]["system-prompt.md"] == "be kind"
    secret = found["Secret"]["data"]
    assert base64.b64decode(secret["mcp-files-token"]) == b"s3cret" and secret["runner-token"]
    assert found["PersistentVolumeClaim"]["status"]["phase"] == "Bound"
    pod = found["Pod"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION]

    # Idempotent: another reconciliation changes nothing and keeps the runner token.
    await ops.merge_patch(agentsession.KIND, tenant, "ready", {"metadata": {"labels": {"touch": "1"}}})
    await session_in_phase(ops, tenant, "ready", "Running")
    again = await children(ops, tenant, "ready")
    assert again["Pod"]["metadata"]["uid"] == pod["metadata"]["uid"]
    assert again["Secret"]["data"]["runner-token"] == secret["runner-token"]



async def test_a_provider_key_reaches_the_egress_proxy_alone(operator, ops, tenant):
    key = "sk-ant-op-" + secrets.token_hex(8)
    await ops.create(session_manifest("keyed", tenant, agent={"runtime": "claude-code"}, egress={
        "allow": ["api.github.com"], "providerKey": {"name": "llm-keys", "key": "anthropic"}}))
    # The key's Secret does not exist yet: the session says so and no pod is made.
    waiting = await session_in_phase(ops, tenant, "keyed", "Failed")
    ready = next(c for c in waiting["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ProviderKeyNotFound" and "spec.egress.providerKey" in ready["message"]
    assert await ops.get("Pod", tenant, naming.child_name("keyed")) is None
    await ops.create({"apiVersion": "v1", "kind": "Secret",
                      "metadata": {"name": "llm-keys", "namespace": tenant},
                      "data": {"anthropic": base64.b64encode(key.encode()).decode()}})
    body = await session_in_phase(ops, tenant, "keyed", "Running")
    found = await children(ops, tenant, "keyed")
    pod = found["Pod"]
    (runner,) = pod["spec"]["containers"]
    gateway, egress = pod["spec"]["initContainers"]
    env = {item["name"]: item for item in runner["env"]}
    assert env["ANTHROPIC_API_KEY"] == {"name": "ANTHROPIC_API_KEY", "value": "agentbox-placeholder-key"}
    assert env["ANTHROPIC_BASE_URL"]["value"] == "http://127.0.0.1:8766/anthropic"
    assert env["HTTPS_PROXY"]["value"] == "http://127.0.0.1:8767"
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}

    def secret_items(container):
        return {item["key"] for mount in container["volumeMounts"]
                for item in (volumes[mount["name"]].get("secret") or {}).get("items", [])}

    assert secret_items(egress) == {"provider-key"}
    assert "provider-key" not in secret_items(runner) | secret_items(gateway)
    assert base64.b64decode(found["Secret"]["data"]["provider-key"]).decode() == key
    readable = json.dumps([body, pod, found["ConfigMap"], found["NetworkPolicy"]])
    assert key not in readable, "the key is in the Secrets alone"
    proxy = json.loads(found["ConfigMap"]["data"]["egress.json"])
    assert proxy["allow"] == ["api.github.com"] and proxy["provider"]["keyFile"].endswith("/provider-key")
    assert found["NetworkPolicy"]["spec"]["egress"][1]["ports"] == [{"protocol": "TCP", "port": 443}]

    # A rotated key reaches the proxy: the operator re-reads the Secret and the pod rolls.
    rotated = "sk-ant-rotated-" + secrets.token_hex(8)
    await ops.merge_patch("Secret", tenant, "llm-keys",
                          {"data": {"anthropic": base64.b64encode(rotated.encode()).decode()}})

    async def rolled():
        now = await children(ops, tenant, "keyed")
        copied = base64.b64decode(((now["Secret"] or {}).get("data") or {}).get("provider-key", "")).decode()
        replaced = now["Pod"] is not None and now["Pod"]["metadata"]["uid"] != pod["metadata"]["uid"]
        return copied == rotated and replaced

    await eventually(rolled, timeout=30, what="the rotated key copied and the pod replaced")

HARDENING_FLIPS = {
    "allowPrivilegeEscalation": lambda pod: pod["spec"]["containers"][0]["securityContext"].update(
        allowPrivilegeEscalation=True
    ),
    "capabilities": lambda pod: pod["spec"]["containers"][0]["securityContext"].update(
        capabilities={"add": ["NET_ADMIN"]}
    ),
    "runAsNonRoot": lambda pod: (
        [c["securityContext"].update(runAsNonRoot=False, runAsUser=0) for c in pod["spec"]["containers"]]
        and pod["spec"]["securityContext"].update(runAsNonRoot=False, runAsUser=0)
    ),
    "seccompProfile": lambda pod: (
        [
            c["securityContext"].pop("seccompProfile")
            for c in (*pod["spec"]["containers"], *pod["spec"]["initContainers"])
        ]
        and pod["spec"]["securityContext"].pop("seccompProfile")
    ),
    "dropAll": lambda pod: pod["spec"]["initContainers"][0]["securityContext"].pop("capabilities"),
    "hostPath": lambda pod: pod["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
    "hostNetwork": lambda pod: pod["spec"].update(hostNetwork=True),
}


@pytest.mark.parametrize("flip", [None, *HARDENING_FLIPS])
async def test_pod_is_admitted_under_restricted_and_any_flip_is_rejected(kube, ops, namespace, flip):
    await ops.merge_patch(
        "Namespace",
        None,
        namespace,
        {
            "metadata": {
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                }
            }
        },
    )
    session = Session(
        "dry",
        namespace,
        "00000000-0000-0000-0000-000000000000",
        AgentSessionSpec.model_validate({"tenant": {"org": "acme", "user": "u"}}),
    )
    pod = build_pod(
        session,
        image="img:1",
        pull_policy="IfNotPresent",
        config_digest="x",
        runner_resources={},
        gateway_resources={},
    )
    del pod["metadata"]["ownerReferences"]
    if flip:
        pod = copy.deepcopy(pod)
        HARDENING_FLIPS[flip](pod)
    async with kube.api_client() as api:
        call = api.call_api(
            f"/api/v1/namespaces/{namespace}/pods",
            "POST",
            query_params=[("dryRun", "All")],
            body=pod,
            auth_settings=["BearerToken"],
            response_types_map={201: "object"},
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            _return_http_data_only=True,
        )
        if flip is None:
            assert (await call)["metadata"]["name"] == naming.child_name("dry")
        else:
            with pytest.raises(ApiException) as error:
                await call
            assert error.value.status == 403 and "restricted" in error.value.body


async def test_suspend_and_resume_keep_the_workspace(operator, ops, tenant):
    await ops.create(session_manifest("nap", tenant))
    await session_in_phase(ops, tenant, "nap", "Running")
    claim = (await children(ops, tenant, "nap"))["PersistentVolumeClaim"]
    await ops.merge_patch(agentsession.KIND, tenant, "nap", {"spec": {"lifecycle": {"suspend": True}}})
    body = await session_in_phase(ops, tenant, "nap", "Suspended")
    assert {c["type"]: c["status"] for c in body["status"]["conditions"]}["Suspended"] == "True"
    await eventually(lambda: _gone(ops, "Pod", tenant, naming.child_name("nap")))
    assert (await children(ops, tenant, "nap"))["PersistentVolumeClaim"]["metadata"]["uid"] == claim[
        "metadata"
    ]["uid"]
    await ops.merge_patch(agentsession.KIND, tenant, "nap", {"spec": {"lifecycle": {"suspend": False}}})
    await session_in_phase(ops, tenant, "nap", "Running")
    found = await children(ops, tenant, "nap")
    assert found["PersistentVolumeClaim"]["metadata"]["uid"] == claim["metadata"]["uid"]
    claim_volume = next(v for v in found["Pod"]["spec"]["volumes"] if v["name"] == "workspace")
    assert claim_volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


async def _events_of(kube, namespace, name):
    async with kube.api_client() as api:
        listing = await client.CoreV1Api(api).list_namespaced_event(
            namespace, field_selector=f"involvedObject.kind={agentsession.KIND},involvedObject.name={name}")
    return {event.reason: event.message for event in listing.items}


def _log_lines_about(log_path, namespace, name):
    """The operator's JSON log lines about a session, its pod and its claim."""
    about = {(agentsession.KIND, name), ("Pod", naming.child_name(name)),
             ("PersistentVolumeClaim", naming.child_name(name))}
    with open(log_path) as log:
        lines = [json.loads(line) for line in log if line.startswith("{")]
    return [line for line in lines if (line.get("object") or {}).get("namespace") == namespace
            and (line["object"].get("kind"), line["object"].get("name")) in about]


async def test_the_request_behind_a_change_is_named_in_its_events_and_log_lines(operator, kube, ops, tenant):
    created_by, suspended_by = f"req-create-{tenant}", f"req-suspend-{tenant}"
    manifest = session_manifest("traced", tenant)
    manifest["metadata"]["annotations"] = {naming.REQUEST_ID_ANNOTATION: created_by}
    await ops.create(manifest)
    await session_in_phase(ops, tenant, "traced", "Running")

    async def announced(*reasons):
        events = await _events_of(kube, tenant, "traced")
        return events if set(reasons) <= set(events) else None

    events = await eventually(lambda: announced("PodCreated", "SessionReady"), what="the session's Events")
    assert all(message.endswith(f"(request {created_by})") for message in events.values()), events
    await ops.merge_patch(agentsession.KIND, tenant, "traced", {
        "metadata": {"annotations": {naming.REQUEST_ID_ANNOTATION: suspended_by}},
        "spec": {"lifecycle": {"suspend": True}}})
    await session_in_phase(ops, tenant, "traced", "Suspended")
    events = await eventually(lambda: announced("SuspendedByUser"), what="the suspension's Event")
    assert events["SuspendedByUser"].endswith(f"(request {suspended_by})")

    async def logged():
        lines = await asyncio.to_thread(_log_lines_about, operator.log_path, tenant, "traced")
        return lines if {line.get("request_id") for line in lines} >= {created_by, suspended_by} else None

    lines = await eventually(logged, what="log lines naming both requests")
    assert all(line.get("request_id") in (created_by, suspended_by) for line in lines), lines
    assert {agentsession.KIND, "Pod"} <= {line["object"]["kind"] for line in lines}


def _storage_class(name, binding_mode):
    # No provisioner: a claim of this class binds only to a volume made for it by hand.
    return {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": name},
            "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode": binding_mode}


def _reasons(body):
    return {c["type"]: c["reason"] for c in ((body or {}).get("status") or {}).get("conditions") or []}


async def _waiting_for_workspace(ops, namespace, name):
    body = await ops.get(agentsession.KIND, namespace, name)
    return _reasons(body).get("PodScheduled") == "WaitingForWorkspace" and body


async def _bind_by_hand(kube, ops, namespace, name, storage_class, volume):
    """A volume made for the session's claim, which the claim then binds to."""
    claim = await ops.get("PersistentVolumeClaim", namespace, naming.child_name(name))
    await kube.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": volume},
        "spec": {"capacity": {"storage": claim["spec"]["resources"]["requests"]["storage"]},
                 "accessModes": claim["spec"]["accessModes"], "storageClassName": storage_class,
                 "persistentVolumeReclaimPolicy": "Retain", "hostPath": {"path": f"/tmp/{volume}"},
                 "claimRef": {"namespace": namespace, "name": claim["metadata"]["name"],
                              "uid": claim["metadata"]["uid"]}}}))


def _status_writes_refused(policy, namespace, name):
    """A ValidatingAdmissionPolicy (and its binding) refusing every status write of one session."""
    rules = [{"apiGroups": [agentsession.GROUP], "apiVersions": ["*"], "operations": ["UPDATE"],
              "resources": [f"{agentsession.PLURAL}/status"]}]
    return [
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": policy},
         "spec": {"failurePolicy": "Fail", "matchConstraints": {"resourceRules": rules},
                  "validations": [{"expression": f"object.metadata.name != '{name}'",
                                   "message": "status writes refused by the test"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": policy},
         "spec": {"policyName": policy, "validationActions": ["Deny"], "matchResources": {
             "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}}}]


async def test_a_status_the_apiserver_refused_after_a_pod_event_is_written_later(operator, kube, ops,
                                                                                 tenant):
    """kopf hands each watch event to its handler once: a status write refused then (an apiserver error,
    an admission webhook) is made by a reconcile retried until it goes through, with no further event."""
    storage_class, volume, policy = f"manual-{tenant}", f"pv-{tenant}", f"refuse-{tenant}"
    await kube.kubectl("apply", "-f", "-", input=json.dumps(_storage_class(storage_class, "Immediate")))
    try:
        await ops.create(session_manifest("refused", tenant, workspace={"storageClassName": storage_class}))
        await eventually(lambda: _waiting_for_workspace(ops, tenant, "refused"),
                         what="the session waiting for its workspace claim")
        await kube.kubectl("apply", "-f", "-", input="\n---\n".join(
            json.dumps(manifest) for manifest in _status_writes_refused(policy, tenant, "refused")))

        async def refusing():
            async with kube.api_client() as api:
                try:
                    await client.CustomObjectsApi(api).patch_namespaced_custom_object_status(
                        agentsession.GROUP, agentsession.VERSION, tenant, agentsession.PLURAL, "refused",
                        {"status": {"phase": "Pending"}}, dry_run="All",
                        _content_type="application/merge-patch+json")
                except ApiException as error:
                    return error.status in (403, 422)
            return False

        await eventually(refusing, what="the policy in force")
        # The claim binds, the pod goes out and runs: every status write that follows is refused.
        await _bind_by_hand(kube, ops, tenant, "refused", storage_class, volume)

        async def running_pod():
            pod = await ops.get("Pod", tenant, naming.child_name("refused"))
            return pod and _pod_ready(pod)

        await eventually(running_pod, what="the sandbox pod Ready")
        await asyncio.sleep(1)
        assert (await ops.get(agentsession.KIND, tenant, "refused"))["status"]["phase"] == "Pending"
        await kube.kubectl("delete", f"validatingadmissionpolicybinding/{policy}",
                           f"validatingadmissionpolicy/{policy}")
        await session_in_phase(ops, tenant, "refused", "Running", timeout=20)
    finally:
        await kube.kubectl("delete", "--ignore-not-found", "--wait=false", f"persistentvolume/{volume}",
                           f"storageclass/{storage_class}", f"validatingadmissionpolicybinding/{policy}",
                           f"validatingadmissionpolicy/{policy}")


def _pod_ready(pod):
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


async def test_the_pod_waits_for_a_claim_that_binds_on_its_own(operator, kube, ops, tenant):
    storage_class, volume = f"manual-{tenant}", f"pv-{tenant}"
    await kube.kubectl("apply", "-f", "-", input=json.dumps(_storage_class(storage_class, "Immediate")))
    try:
        await ops.create(session_manifest("held", tenant, workspace={"storageClassName": storage_class}))
        body = await eventually(lambda: _waiting_for_workspace(ops, tenant, "held"),
                                what="the session waiting for its workspace claim")
        assert body["status"]["phase"] == "Pending"
        assert await ops.get("Pod", tenant, naming.child_name("held")) is None
        await _bind_by_hand(kube, ops, tenant, "held", storage_class, volume)
        body = await session_in_phase(ops, tenant, "held", "Running")
        assert _reasons(body)["WorkspaceReady"] == "ClaimBound"
    finally:
        await kube.kubectl("delete", "--ignore-not-found", "--wait=false", f"persistentvolume/{volume}",
                           f"storageclass/{storage_class}")


async def test_a_resize_the_storage_class_refuses_is_reported_and_the_session_runs_on(operator, kube, ops,
                                                                                     tenant):
    storage_class, volume = f"fixed-{tenant}", f"pv-fixed-{tenant}"  # no allowVolumeExpansion
    await kube.kubectl("apply", "-f", "-", input=json.dumps(_storage_class(storage_class, "Immediate")))
    try:
        await ops.create(session_manifest("grow", tenant, workspace={"storageClassName": storage_class}))
        await eventually(lambda: _waiting_for_workspace(ops, tenant, "grow"),
                         what="the session waiting for its workspace claim")
        await _bind_by_hand(kube, ops, tenant, "grow", storage_class, volume)
        await session_in_phase(ops, tenant, "grow", "Running")
        await ops.merge_patch(agentsession.KIND, tenant, "grow", {"spec": {"workspace": {"size": "2Gi"}}})

        async def refused():
            body = await ops.get(agentsession.KIND, tenant, "grow")
            return _reasons(body).get("WorkspaceReady") == "ClaimUpdateRefused" and body

        body = await eventually(refused, what="WorkspaceReady ClaimUpdateRefused")
        assert body["status"]["phase"] == "Running"
        workspace = next(c for c in body["status"]["conditions"] if c["type"] == "WorkspaceReady")
        assert "resize" in workspace["message"], workspace
        claim = await ops.get("PersistentVolumeClaim", tenant, naming.child_name("grow"))
        assert claim["spec"]["resources"]["requests"]["storage"] == "1Gi"
    finally:
        await kube.kubectl("delete", "--ignore-not-found", "--wait=false", f"persistentvolume/{volume}",
                           f"storageclass/{storage_class}")


@pytest.mark.parametrize("binding_mode", ["WaitForFirstConsumer", None])
async def test_the_pod_goes_at_once_when_its_claim_cannot_bind_first(operator, kube, ops, tenant,
                                                                     binding_mode):
    """A claim bound only once its pod is scheduled, or of a class that cannot be read: the pod is not
    held back (the scheduler says what it waits for)."""
    storage_class = f"late-{tenant}"
    if binding_mode:
        await kube.kubectl("apply", "-f", "-", input=json.dumps(_storage_class(storage_class, binding_mode)))
    try:
        await ops.create(session_manifest("soon", tenant, workspace={"storageClassName": storage_class}))
        pod = await eventually(lambda: ops.get("Pod", tenant, naming.child_name("soon")),
                               what="the sandbox pod")
        assert pod["metadata"]["labels"][naming.SESSION_LABEL] == "soon"
        claim = await ops.get("PersistentVolumeClaim", tenant, naming.child_name("soon"))
        assert claim["status"]["phase"] == "Pending"
    finally:
        await kube.kubectl("delete", "--ignore-not-found", "--wait=false", f"storageclass/{storage_class}")


async def _gone(ops, kind, namespace, name):
    return await ops.get(kind, namespace, name) is None


async def test_shutdown_time_expires_the_session(operator, ops, tenant):
    soon = (datetime.now(UTC) + timedelta(seconds=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await ops.create(session_manifest("brief", tenant, lifecycle={"shutdownTime": soon}))
    await session_in_phase(ops, tenant, "brief", "Running")
    body = await session_in_phase(ops, tenant, "brief", "Expired", timeout=20)
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ShutdownTimeReached"
    await eventually(lambda: _gone(ops, "Pod", tenant, naming.child_name("brief")))
    assert (await children(ops, tenant, "brief"))["PersistentVolumeClaim"] is not None


async def test_idleness_suspends_and_kubectl_resumes(operator, ops, tenant):
    await ops.create(session_manifest("idle", tenant, lifecycle={"idleTimeout": "4s"}))
    await session_in_phase(ops, tenant, "idle", "Running")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    await ops.merge_patch(
        agentsession.KIND,
        tenant,
        "idle",
        {"metadata": {"annotations": {naming.LAST_ACTIVITY_ANNOTATION: now}}},
    )
    body = await session_in_phase(ops, tenant, "idle", "Suspended", timeout=20)
    assert body["status"]["lastActivityTime"] == now
    by_type = {c["type"]: c for c in body["status"]["conditions"]}
    assert by_type["Ready"]["reason"] == by_type["Suspended"]["reason"] == "IdleTimeoutReached"
    # One switch: the spec says suspended, the annotation says why.
    assert body["spec"]["lifecycle"]["suspend"] is True
    assert body["metadata"]["annotations"][naming.SUSPEND_REASON_ANNOTATION] == "IdleTimeoutReached"
    await eventually(lambda: _gone(ops, "Pod", tenant, naming.child_name("idle")))
    assert (await children(ops, tenant, "idle"))["PersistentVolumeClaim"] is not None

    # Cleared by hand: running again with a fresh idle clock, and the reason gone.
    await ops.merge_patch(agentsession.KIND, tenant, "idle", {"spec": {"lifecycle": {"suspend": False}}})
    body = await session_in_phase(ops, tenant, "idle", "Running", timeout=20)
    await eventually(lambda: _no_suspend_reason(ops, tenant, "idle"))
    # ...and idle again a few seconds later.
    body = await session_in_phase(ops, tenant, "idle", "Suspended", timeout=20)
    assert body["metadata"]["annotations"][naming.SUSPEND_REASON_ANNOTATION] == "IdleTimeoutReached"


async def _no_suspend_reason(ops, namespace, name):
    body = await ops.get(agentsession.KIND, namespace, name)
    return naming.SUSPEND_REASON_ANNOTATION not in (body["metadata"].get("annotations") or {})


async def test_deletion_leaves_nothing_behind(operator, ops, tenant):
    await ops.create(session_manifest("gone", tenant))
    await session_in_phase(ops, tenant, "gone", "Running")
    await ops.delete(agentsession.KIND, tenant, "gone")

    async def nothing_left():
        found = await children(ops, tenant, "gone")
        return all(
            child is None or child["metadata"].get("deletionTimestamp") for child in found.values()
        ) and (all(child is None for kind, child in found.items() if kind != "Pod"))

    await eventually(nothing_left, timeout=60)


async def test_retained_workspace_survives_deletion(operator, ops, tenant):
    await ops.create(session_manifest("keep", tenant, workspace={"retainOnDelete": True}))
    await session_in_phase(ops, tenant, "keep", "Running")
    await ops.delete(agentsession.KIND, tenant, "keep")
    await eventually(lambda: _gone(ops, agentsession.KIND, tenant, "keep"))
    await eventually(lambda: _gone(ops, "Service", tenant, naming.child_name("keep")), timeout=60)
    claim = await ops.get("PersistentVolumeClaim", tenant, naming.child_name("keep"))
    assert claim is not None and not claim["metadata"].get("deletionTimestamp")
    assert not claim["metadata"].get("ownerReferences")


async def test_changing_an_mcpserver_rolls_the_pod(operator, ops, tenant):
    await ops.create(mcpserver_manifest("tools", tenant, transport="stdio", stdio={"command": "tool-a"}))
    await ops.create(session_manifest("roll", tenant, mcpServers=[{"name": "tools"}]))
    await session_in_phase(ops, tenant, "roll", "Running")
    before = (await children(ops, tenant, "roll"))["Pod"]
    await ops.merge_patch(mcpserver.KIND, tenant, "tools", {"spec": {"stdio": {"command": "tool-b"}}})

    async def rolled():
        pod = await ops.get("Pod", tenant, naming.child_name("roll"))
        return pod if pod and pod["metadata"]["uid"] != before["metadata"]["uid"] else None

    after = await eventually(rolled)
    hash_key = naming.CONFIG_HASH_ANNOTATION
    assert after["metadata"]["annotations"][hash_key] != before["metadata"]["annotations"][hash_key]
    config = (await children(ops, tenant, "roll"))["ConfigMap"]
    assert json.loads(config["data"]["gateway.json"])["upstreams"][0]["command"] == "tool-b"
    await session_in_phase(ops, tenant, "roll", "Running")


async def test_editing_what_the_pod_runs_replaces_it(operator, ops, tenant):
    await ops.create(session_manifest("edited", tenant))
    await session_in_phase(ops, tenant, "edited", "Running")
    before = (await children(ops, tenant, "edited"))["Pod"]
    limits = {"cpu": "300m", "memory": "300Mi"}
    await ops.merge_patch(agentsession.KIND, tenant, "edited", {"spec": {"resources": {"limits": limits}}})

    async def replaced():
        pod = await ops.get("Pod", tenant, naming.child_name("edited"))
        return pod if pod and pod["metadata"]["uid"] != before["metadata"]["uid"] else None

    after = await eventually(replaced)
    runner = next(c for c in after["spec"]["containers"] if c["name"] == "runner")
    assert runner["resources"]["limits"] == limits
    key = naming.SPEC_HASH_ANNOTATION
    assert after["metadata"]["annotations"][key] != before["metadata"]["annotations"][key]
    await session_in_phase(ops, tenant, "edited", "Running")


async def test_missing_mcpserver_is_reported_and_the_session_still_starts(operator, ops, tenant):
    await ops.create(session_manifest("lonely", tenant, mcpServers=[{"name": "nowhere"}]))
    body = await session_in_phase(ops, tenant, "lonely", "Running")
    mcp_ready = next(c for c in body["status"]["conditions"] if c["type"] == "MCPReady")
    assert mcp_ready["status"] == "False" and mcp_ready["reason"] == "MCPServerNotFound"
    assert "nowhere" in mcp_ready["message"]


async def test_a_foreign_object_is_never_overwritten(operator, ops, tenant):
    child = naming.child_name("clash")
    await ops.create(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": child, "namespace": tenant},
            "data": {"mine": "yes"},
        }
    )
    await ops.create(session_manifest("clash", tenant))
    body = await session_in_phase(ops, tenant, "clash", "Failed")
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "NameConflict" and child in ready["message"]
    found = await children(ops, tenant, "clash")
    assert found["ConfigMap"]["data"] == {"mine": "yes"}
    assert found["Pod"] is None and found["Secret"] is None  # nothing half-built
    await ops.delete("ConfigMap", tenant, child)
    await session_in_phase(ops, tenant, "clash", "Running", timeout=40)


async def test_the_first_pod_follows_a_secret_left_by_an_earlier_pass(operator, ops, tenant):
    """The first pass makes the pod in the same round as its siblings, so before it knows whether the
    Secret (and its runner token) was already there: when it was, the token stays and the pod matches it."""
    child = naming.child_name("kept")
    earlier = base64.b64encode(b"token-of-an-earlier-pass").decode()
    labels = naming.session_labels("kept", tenant.removeprefix("t-"))
    await ops.create({"apiVersion": "v1", "kind": "Secret", "data": {RUNNER_TOKEN_KEY: earlier},
                      "metadata": {"name": child, "namespace": tenant, "labels": labels}})
    await ops.create(session_manifest("kept", tenant))

    async def pod_matches_its_config():
        found = await children(ops, tenant, "kept")
        pod = found["Pod"]
        if pod is None or pod["metadata"].get("deletionTimestamp"):
            return None
        digest = pod["metadata"]["annotations"][naming.CONFIG_HASH_ANNOTATION]
        return digest == config_hash(found["ConfigMap"], found["Secret"]) and found

    found = await eventually(pod_matches_its_config)
    assert found["Secret"]["data"][RUNNER_TOKEN_KEY] == earlier
    await session_in_phase(ops, tenant, "kept", "Running")


@pytest.mark.parametrize(
    ("manifest", "field"),
    [
        (
            mcpserver_manifest("bad1", "NS", transport="stdio", url="https://x", stdio={"command": "npx"}),
            "spec.url",
        ),
        (mcpserver_manifest("bad2", "NS", transport="sse"), "spec.url"),
        (mcpserver_manifest("bad3", "NS", transport="stdio"), "spec.stdio"),
        (
            mcpserver_manifest("bad4", "NS", transport="sse", url="https://x", auth={"type": "bearer"}),
            "spec.auth",
        ),
        (session_manifest("bad5", "t-x", agent={"runtime": "custom"}), "spec.agent.command"),
        (session_manifest("bad6", "t-x", workspace={"size": "lots"}), "spec.workspace.size"),
        (session_manifest("bad6b", "t-x", workspace={"size": "0"}), "spec.workspace.size"),
        (session_manifest("bad5b", "t-x", agent={"runtime": "custom", "command": []}), "spec.agent.command"),
        (session_manifest("bad7", "t-x", lifecycle={"idleTimeout": "1 day"}), "spec.lifecycle.idleTimeout"),
        (
            session_manifest("bad8", "t-x", agent={"env": [{"name": "AGENTBOX_RUNTIME", "value": "x"}]}),
            "AGENTBOX_",
        ),
        (
            session_manifest("bad9", "t-x", agent={"env": [{"name": "ANTHROPIC_API_KEY", "value": "sk-x"}]}),
            "spec.egress.providerKey",
        ),
        (session_manifest("bad10", "t-x", egress={"allow": ["https://github.com"]}), "spec.egress.allow"),
        (session_manifest("bad11", "t-x", egress={"allow": ["10.0.0.1"]}), "spec.egress.allow"),
        (
            session_manifest("bad12", "t-x", agent={"runtime": "scripted"},
                             egress={"providerKey": {"name": "k", "key": "api-key"}}),
            "spec.egress.provider is required",
        ),
    ],
)
async def test_invalid_specs_are_rejected_at_admission(ops, namespace, manifest, field):
    manifest = copy.deepcopy(manifest)
    manifest["metadata"]["namespace"] = namespace
    with pytest.raises(ApiException) as error:
        await ops.create(manifest)
    assert error.value.status == 422 and field in error.value.body


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tenant": {"org": "someone-else"}}, "spec.tenant.org is immutable"),
        ({"workspace": {"size": "512Mi"}}, "spec.workspace.size may grow, never shrink"),
        ({"workspace": {"storageClassName": "other"}}, "spec.workspace.storageClassName is immutable"),
    ],
)
async def test_transition_rules(ops, namespace, change, field):
    await ops.create(session_manifest("steady", namespace, workspace={"size": "1Gi"}))
    with pytest.raises(ApiException) as error:
        await ops.merge_patch(agentsession.KIND, namespace, "steady", {"spec": change})
    assert error.value.status == 422 and field in error.value.body
    await ops.merge_patch(agentsession.KIND, namespace, "steady", {"spec": {"workspace": {"size": "2Gi"}}})


async def test_a_pod_the_tenant_limits_refuse_is_reported(operator, ops, tenant):
    huge = {"requests": {"cpu": "1"}, "limits": {"cpu": "64"}}  # the tenant LimitRange allows 8 per container
    await ops.create(session_manifest("greedy", tenant, resources=huge))
    body = await session_in_phase(ops, tenant, "greedy", "Failed")
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "PodRejected" and "forbidden" in ready["message"]
    assert (await children(ops, tenant, "greedy"))["Pod"] is None


async def test_only_retained_workspaces_put_a_finalizer_on_anything(operator, ops, tenant):
    """A namespace deleted while the operator is down must not hang in Terminating: nothing but a session
    with retainOnDelete (whose claim must be cut loose first) carries the operator's finalizer."""
    await ops.create(mcpserver_manifest("remote", tenant, transport="streamable-http", url="http://127.0.0.1:9/mcp"))
    await ops.create(
        session_manifest("timed", tenant, lifecycle={"idleTimeout": "1h"}, mcpServers=[{"name": "remote"}])
    )
    await ops.create(session_manifest("kept", tenant, workspace={"retainOnDelete": True}))
    await session_in_phase(ops, tenant, "timed", "Running")
    await session_in_phase(ops, tenant, "kept", "Running")
    server = await eventually(lambda: _probed(ops, tenant, "remote"))
    timed = await ops.get(agentsession.KIND, tenant, "timed")
    assert not server["metadata"].get("finalizers") and not timed["metadata"].get("finalizers")
    kept = await ops.get(agentsession.KIND, tenant, "kept")
    assert kept["metadata"].get("finalizers") == ["operator.agentbox.dev/finalizer"]


async def test_a_deleted_namespace_does_not_hang_on_a_retained_workspace(operator, ops, tenant):
    """kopf stops watching a namespace it serves by pattern once the namespace terminates, so the session's
    own deletion is never seen: the operator lets it go from the namespace's events instead."""
    await ops.create(session_manifest("kept", tenant, workspace={"retainOnDelete": True}))
    await session_in_phase(ops, tenant, "kept", "Running")
    await ops.delete("Namespace", None, tenant)

    async def namespace_gone():
        return await ops.get("Namespace", None, tenant) is None

    await eventually(namespace_gone, timeout=90, what=f"namespace {tenant} to be deleted")


async def _probed(ops, namespace, name):
    server = await ops.get(mcpserver.KIND, namespace, name)
    return server if (server.get("status") or {}).get("lastProbeTime") else None


async def test_a_changed_credential_rolls_the_pod_without_waiting_for_a_reconcile(operator, ops, tenant):
    token = {"token": base64.b64encode(b"old").decode()}
    await ops.create({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "cred", "namespace": tenant},
                      "data": token})
    ref = {"name": "cred", "key": "token"}
    bearer = {"type": "bearer", "secretRef": ref}
    stdio = {"command": "tool", "envFrom": [{"name": "TOOL_TOKEN", "secretKeyRef": ref}]}
    await ops.create(mcpserver_manifest("locked", tenant, transport="stdio", stdio=stdio, auth=bearer))
    await ops.create(session_manifest("rotate", tenant, mcpServers=[{"name": "locked"}]))
    await session_in_phase(ops, tenant, "rotate", "Running")
    before = (await children(ops, tenant, "rotate"))["Pod"]
    await ops.merge_patch("Secret", tenant, "cred", {"data": {"token": base64.b64encode(b"new").decode()}})

    async def rolled():
        found = await children(ops, tenant, "rotate")
        pod, secret = found["Pod"], found["Secret"]
        fresh = pod and pod["metadata"]["uid"] != before["metadata"]["uid"]
        keys = ("mcp-locked-token", "mcp-locked-env-TOOL_TOKEN")
        values = {base64.b64decode(secret["data"][key]) for key in keys}
        return fresh and values == {b"new"}

    await eventually(rolled, timeout=20)
