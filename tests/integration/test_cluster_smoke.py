"""The local cluster is a real one: API server validation, scheduling onto kwok nodes, volumes that bind,
garbage collection by the controller-manager, RBAC, and the version we built.

The pure logic of hack/storage_provisioner.py is tested here too, without a cluster.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from fixtures.cluster import REPO, Kube, KubectlError, read_versions
from fixtures.polling import eventually
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

GROUP, VERSION, PLURAL = "smoke.agentbox.dev", "v1", "widgets"

WIDGET_CRD = f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: {PLURAL}.{GROUP}
spec:
  group: {GROUP}
  scope: Namespaced
  names: {{plural: {PLURAL}, singular: widget, kind: Widget}}
  versions:
  - name: {VERSION}
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [size]
            properties:
              size: {{type: integer, minimum: 1}}
              mode: {{type: string, enum: [fixed, auto]}}
              limit: {{type: integer}}
            x-kubernetes-validations:
            - rule: "self.mode != 'fixed' || has(self.limit)"
              message: "a fixed widget needs a limit"
"""


def load_provisioner():
    path = REPO / "hack" / "storage_provisioner.py"
    spec = importlib.util.spec_from_file_location("storage_provisioner", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def api_error_message(error: ApiException) -> str:
    return json.loads(error.body)["message"]


# ------------------------------------------------------------------------------ provisioner, no cluster

CLAIM = {
    "metadata": {"name": "work", "namespace": "tenant-a", "uid": "0b6f"},
    "spec": {
        "storageClassName": "standard",
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "2Gi"}},
    },
    "status": {"phase": "Pending"},
}


def test_provisioner_answers_a_pending_claim_of_its_class_with_a_bound_hostpath_volume():
    provisioner = load_provisioner()
    assert provisioner.claim_needs_volume(CLAIM, "standard")
    volume = provisioner.volume_for_claim(CLAIM, "standard", Path("/vols"))
    assert volume["metadata"]["name"] == "pvc-0b6f"
    assert volume["metadata"]["annotations"] == {"pv.kubernetes.io/provisioned-by": "agentbox.dev/hostpath"}
    spec = volume["spec"]
    assert spec["claimRef"] == {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "namespace": "tenant-a", "name": "work", "uid": "0b6f",
    }
    assert spec["capacity"] == {"storage": "2Gi"}
    assert spec["accessModes"] == ["ReadWriteOnce"]
    assert spec["persistentVolumeReclaimPolicy"] == "Delete"
    assert spec["hostPath"]["path"] == "/vols/pvc-0b6f"


def test_provisioner_rebinds_only_its_own_claims_a_lagging_cache_marked_lost():
    provisioner = load_provisioner()
    lost = {**CLAIM, "spec": {**CLAIM["spec"], "volumeName": "pvc-0b6f"}, "status": {"phase": "Lost"}}
    assert provisioner.claim_lost_to_a_lagging_cache(lost, "standard")
    assert not provisioner.claim_lost_to_a_lagging_cache(lost, "fast")  # another class's claim
    assert not provisioner.claim_lost_to_a_lagging_cache(  # bound to a volume we did not make
        {**lost, "spec": {**lost["spec"], "volumeName": "pv-elsewhere"}}, "standard")
    assert not provisioner.claim_lost_to_a_lagging_cache({**lost, "status": {"phase": "Bound"}}, "standard")
    assert not provisioner.claim_lost_to_a_lagging_cache(
        {**lost, "metadata": {**lost["metadata"], "deletionTimestamp": "2026-11-26T00:00:00Z"}}, "standard")


@pytest.mark.parametrize(
    "change",
    [
        {"spec": {**CLAIM["spec"], "storageClassName": "other"}},
        {"spec": {**CLAIM["spec"], "volumeName": "pvc-0b6f"}},
        {"spec": {**CLAIM["spec"], "volumeMode": "Block"}},
        {"status": {"phase": "Bound"}},
        {"metadata": {**CLAIM["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}},
    ],
    ids=["other-class", "already-bound", "block-mode", "bound-phase", "being-deleted"],
)
def test_provisioner_leaves_other_claims_alone(change):
    assert not load_provisioner().claim_needs_volume({**CLAIM, **change}, "standard")


def test_provisioner_deletes_only_its_own_released_volumes():
    provisioner = load_provisioner()
    ours = provisioner.volume_for_claim(CLAIM, "standard", Path("/vols"))
    assert not provisioner.volume_to_delete({**ours, "status": {"phase": "Bound"}})
    assert provisioner.volume_to_delete({**ours, "status": {"phase": "Released"}})
    foreign = {**ours, "metadata": {"name": "pv-x", "annotations": {}}, "status": {"phase": "Released"}}
    assert not provisioner.volume_to_delete(foreign)
    retained = {**ours, "spec": {**ours["spec"], "persistentVolumeReclaimPolicy": "Retain"},
                "status": {"phase": "Released"}}
    assert not provisioner.volume_to_delete(retained)


class RecordingCore:
    """The four writes a claim's answer makes, recorded; `fail` makes the first bind write fail once."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[str] = []
        self.fail = fail

    async def create_persistent_volume(self, body):
        self.calls.append("create volume")

    async def patch_persistent_volume_status(self, name, body, **_):
        self.calls.append("bind volume")
        if self.fail:
            self.fail = False
            raise ApiException(status=500, reason="etcd hiccup")

    async def patch_namespaced_persistent_volume_claim(self, name, namespace, body, **_):
        self.calls.append("bind claim")

    async def patch_namespaced_persistent_volume_claim_status(self, name, namespace, body, **_):
        self.calls.append("claim status")


async def test_provisioner_answers_each_claim_once_however_many_events_show_it_unbound(tmp_path):
    provisioner = load_provisioner()
    core = RecordingCore()
    answering = provisioner.Provisioner(core, "standard", tmp_path)
    annotated = {**CLAIM, "metadata": {**CLAIM["metadata"], "annotations": {"volume.kubernetes.io/x": "y"}}}
    await asyncio.gather(answering.on_claim(CLAIM), answering.on_claim(annotated))
    await answering.on_claim(annotated)  # the binder's annotation, delivered after our answer
    assert sorted(core.calls) == ["bind claim", "bind volume", "claim status", "create volume"]
    assert (tmp_path / "pvc-0b6f").is_dir()
    # Seen bound, the claim is forgotten: the memory does not grow with every claim ever answered.
    await answering.on_claim({**CLAIM, "spec": {**CLAIM["spec"], "volumeName": "pvc-0b6f"},
                              "status": {"phase": "Bound"}})
    assert not answering.answered


async def test_provisioner_answers_a_claim_again_when_its_first_answer_failed(tmp_path):
    core = RecordingCore(fail=True)
    answering = load_provisioner().Provisioner(core, "standard", tmp_path)
    with pytest.raises(ApiException):
        await answering.on_claim(CLAIM)
    await answering.on_claim(CLAIM)
    assert core.calls.count("create volume") == 2 and core.calls.count("bind volume") == 2


async def test_provisioner_handles_a_burst_in_parallel_but_bounded_and_surfaces_failures():
    provisioner = load_provisioner()
    workers = provisioner.Workers(limit=4)
    in_flight, peak, release = 0, 0, asyncio.Event()

    async def handle(item):
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1
        if item["fail"]:
            raise RuntimeError("apiserver said no")

    submitting = asyncio.gather(*[workers.submit(handle, {"fail": False}) for _ in range(10)])
    await asyncio.sleep(0.05)
    assert peak == 4 and not submitting.done()  # the fifth waits for a free slot
    release.set()
    await submitting
    await workers.submit(handle, {"fail": True})
    await workers.drain()
    assert peak == 4 and not workers.running
    with pytest.raises(RuntimeError, match="apiserver said no"):  # the watch loop relists and retries
        await workers.submit(handle, {"fail": False})


# ------------------------------------------------------------------------------ the real cluster


@pytest.mark.cluster
async def test_version_is_the_one_built(kube: Kube):
    async with kube.api_client() as api:
        info = await client.VersionApi(api).get_code()
    assert info.git_version == read_versions()["K8S_VERSION"]


@pytest.mark.cluster
async def test_custom_resource_round_trips_and_bad_ones_are_rejected(kube: Kube, namespace: str):
    await kube.kubectl("apply", "--server-side", "--field-manager=agentbox-tests", "-f", "-",
                       input=WIDGET_CRD)
    await kube.kubectl("wait", "--for=condition=Established", "--timeout=30s", f"crd/{PLURAL}.{GROUP}")

    async with kube.api_client() as api:
        objects = client.CustomObjectsApi(api)

        def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
            return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget",
                    "metadata": {"name": name}, "spec": spec}

        async def create(body: dict[str, Any]) -> dict[str, Any]:
            return await objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        await create(widget("good", {"size": 3, "mode": "fixed", "limit": 5}))
        stored = await objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "good")
        assert stored["spec"] == {"size": 3, "mode": "fixed", "limit": 5}

        with pytest.raises(ApiException) as wrong_type:
            await create(widget("wrong-type", {"size": "three"}))
        assert wrong_type.value.status == 422
        assert "spec.size" in api_error_message(wrong_type.value)

        with pytest.raises(ApiException) as cel:
            await create(widget("fixed-without-limit", {"size": 1, "mode": "fixed"}))
        assert cel.value.status == 422
        assert "a fixed widget needs a limit" in api_error_message(cel.value)


@pytest.mark.cluster
async def test_pod_with_a_claim_runs_on_a_kwok_node_and_is_collected_with_its_owner(
    kube: Kube, namespace: str
):
    async with kube.api_client() as api:
        core = client.CoreV1Api(api)
        owner = await core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
        owned_by = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}]
        # No storageClassName: the default class must be filled in by admission.
        await core.create_namespaced_persistent_volume_claim(namespace, {
            "metadata": {"name": "workspace"},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
        })
        await core.create_namespaced_pod(namespace, {
            "metadata": {"name": "worker", "ownerReferences": owned_by},
            "spec": {
                "containers": [{"name": "main", "image": "example.invalid/none:1",
                                "volumeMounts": [{"name": "workspace", "mountPath": "/workspace"}]}],
                "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": "workspace"}}],
            },
        })

        async def running_pod():
            pod = await core.read_namespaced_pod("worker", namespace)
            return pod if pod.status.phase == "Running" else None

        pod = await eventually(running_pod, what="the pod to be Running")
        node = await core.read_node(pod.spec.node_name)
        assert node.metadata.annotations.get("kwok.x-k8s.io/node") == "fake"

        claim = await core.read_namespaced_persistent_volume_claim("workspace", namespace)
        assert claim.spec.storage_class_name == "standard"
        assert claim.status.phase == "Bound"
        volume = await core.read_persistent_volume(claim.spec.volume_name)
        assert volume.metadata.annotations["pv.kubernetes.io/provisioned-by"] == "agentbox.dev/hostpath"
        assert volume.spec.claim_ref.uid == claim.metadata.uid
        assert Path(volume.spec.host_path.path).is_dir()

        await core.delete_namespaced_config_map("owner", namespace)

        async def pod_gone():
            try:
                await core.read_namespaced_pod("worker", namespace)
            except ApiException as error:
                return error.status == 404
            return False

        await eventually(pod_gone, what="the garbage collector to delete the owned pod")

        await core.delete_namespaced_persistent_volume_claim("workspace", namespace)

        async def volume_gone():
            try:
                await core.read_persistent_volume(volume.metadata.name)
            except ApiException as error:
                return error.status == 404
            return False

        await eventually(volume_gone, what="the provisioner to delete the released volume")
        assert not Path(volume.spec.host_path.path).exists()


@pytest.mark.cluster
async def test_rbac_denies_a_service_account_until_it_is_bound_to_a_role(kube: Kube, namespace: str):
    account = f"system:serviceaccount:{namespace}:reader"
    await kube.kubectl("create", "serviceaccount", "reader", "-n", namespace)

    with pytest.raises(KubectlError, match="forbidden"):
        await kube.kubectl("get", "pods", "-n", namespace, f"--as={account}")

    await kube.kubectl("create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace)
    await kube.kubectl("create", "rolebinding", "reader", "--role=pod-reader",
                       f"--serviceaccount={namespace}:reader", "-n", namespace)

    async def allowed():
        try:
            await kube.kubectl("get", "pods", "-n", namespace, f"--as={account}")
        except KubectlError:
            return False
        return True

    await eventually(allowed, timeout=10, what="the RoleBinding to take effect")
    # The binding is namespaced: elsewhere the account is still refused.
    with pytest.raises(KubectlError, match="forbidden"):
        await kube.kubectl("get", "pods", "-n", "default", f"--as={account}")


@pytest.mark.cluster
async def test_deleting_a_namespace_removes_it_and_its_running_pods(kube: Kube, namespace: str):
    async with kube.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_pod(namespace, {
            "metadata": {"name": "idle"},
            "spec": {"containers": [{"name": "main", "image": "example.invalid/none:1"}],
                     "terminationGracePeriodSeconds": 0},
        })

        async def running():
            return (await core.read_namespaced_pod("idle", namespace)).status.phase == "Running"

        await eventually(running, what="the pod to be Running")
        await core.delete_namespace(namespace)

        async def namespace_gone():
            try:
                await core.read_namespace(namespace)
            except ApiException as error:
                return error.status == 404
            return False

        await eventually(namespace_gone, what="the namespace controller to finish deleting the namespace")
