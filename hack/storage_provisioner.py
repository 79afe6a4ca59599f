"""A storage provisioner for the local kwok cluster: claims of one StorageClass get hostPath volumes.

kwok nodes run no kubelet and no CSI driver, so nothing would ever provision a volume and every pod
mounting a claim would stay unschedulable. This process answers each pending claim of its class with a
PersistentVolume (hostPath under the cluster's work directory, claimRef set, annotated
pv.kubernetes.io/provisioned-by); the controller-manager then binds the pair as in any cluster. When a
claim is deleted, the controller-manager marks its volume Released and this process deletes it and its
directory (reclaim policy Delete).

Dev and test tooling only: started in the background by `hack/cluster.sh up`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.operator.kube import skip_environment_lookups

PROVISIONER = "agentbox.dev/hostpath"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
# What the controller-manager's binder stamps on a claim it bound.
BIND_ANNOTATIONS = {"pv.kubernetes.io/bind-completed": "yes", "pv.kubernetes.io/bound-by-controller": "yes"}
# A watch ends after this long; the loop then lists everything again, which also repairs missed events.
RESYNC_SECONDS = 300
RETRY_SECONDS = 1.0
# Claims handled at once: each is a directory plus two rounds of API calls, so latency, not CPU, limits
# the rate (16 at once kept up with only ~15 claims/s on a busy 2-core machine: 20/s piled up for seconds).
CONCURRENCY = 64

log = logging.getLogger("storage-provisioner")


# ------------------------------------------------------------------------------------------ pure logic


def volume_name(claim: dict[str, Any]) -> str:
    return f"pvc-{claim['metadata']['uid']}"


def claim_needs_volume(claim: dict[str, Any], storage_class: str) -> bool:
    """A claim of our class that is waiting for a volume nobody has made yet."""
    meta, spec = claim["metadata"], claim.get("spec") or {}
    return (
        spec.get("storageClassName") == storage_class
        and not spec.get("volumeName")
        and (claim.get("status") or {}).get("phase", "Pending") == "Pending"
        and not meta.get("deletionTimestamp")
        and spec.get("volumeMode", "Filesystem") == "Filesystem"
    )


def claim_lost_to_a_lagging_cache(claim: dict[str, Any], storage_class: str) -> bool:
    """A claim we bound that the controller-manager then marked Lost: its volume cache had not caught up
    with the volume yet (a burst), and it would only look again at its next resync, ~30 s later."""
    spec = claim.get("spec") or {}
    return (
        spec.get("storageClassName") == storage_class
        and spec.get("volumeName") == volume_name(claim)
        and (claim.get("status") or {}).get("phase") == "Lost"
        and not claim["metadata"].get("deletionTimestamp")
    )


def bound_claim_status(volume: dict[str, Any]) -> dict[str, Any]:
    return {"status": {"phase": "Bound", "accessModes": volume["spec"]["accessModes"],
                       "capacity": volume["spec"]["capacity"]}}


def volume_for_claim(claim: dict[str, Any], storage_class: str, volumes_dir: Path) -> dict[str, Any]:
    """The PersistentVolume that satisfies a claim: same size and access modes, bound to it by claimRef."""
    meta, spec = claim["metadata"], claim["spec"]
    name = volume_name(claim)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": name,
            "annotations": {PROVISIONED_BY: PROVISIONER},
            "labels": {"app.kubernetes.io/managed-by": "agentbox-storage-provisioner"},
        },
        "spec": {
            "capacity": {"storage": spec["resources"]["requests"]["storage"]},
            "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
            "volumeMode": "Filesystem",
            "persistentVolumeReclaimPolicy": "Delete",
            "storageClassName": storage_class,
            "hostPath": {"path": str(volumes_dir / name), "type": "DirectoryOrCreate"},
            "claimRef": {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }


def volume_to_delete(volume: dict[str, Any]) -> bool:
    """One of our volumes whose claim is gone, so reclaim policy Delete applies."""
    meta, spec = volume["metadata"], volume.get("spec") or {}
    return (
        (meta.get("annotations") or {}).get(PROVISIONED_BY) == PROVISIONER
        and spec.get("persistentVolumeReclaimPolicy") == "Delete"
        and (volume.get("status") or {}).get("phase") in ("Released", "Failed")
        and not meta.get("deletionTimestamp")
    )


# ------------------------------------------------------------------------------------------ I/O


def make_shared_dir(path: Path) -> None:
    # Writable by any uid, as a fresh volume is: the sandbox runs as 65532, not as us (chmod beats umask).
    path.mkdir(exist_ok=True)
    path.chmod(0o777)


class Provisioner:
    def __init__(self, core: client.CoreV1Api, storage_class: str, volumes_dir: Path) -> None:
        self.core = core
        self.storage_class = storage_class
        self.volumes_dir = volumes_dir
        # Claims answered (or being answered) whose watch events still show them unbound: the binder's own
        # annotation lands meanwhile, and answering that event again would repeat four writes per claim.
        self.answered: set[str] = set()

    async def on_claim(self, claim: dict[str, Any]) -> None:
        if claim_lost_to_a_lagging_cache(claim, self.storage_class):
            await self.restore(claim)
        uid = claim["metadata"]["uid"]
        if not claim_needs_volume(claim, self.storage_class):
            self.answered.discard(uid)
            return
        if uid in self.answered:
            return
        self.answered.add(uid)
        volume = volume_for_claim(claim, self.storage_class, self.volumes_dir)
        try:
            # The directory and the volume object are independent: made at once (nothing runs on kwok nodes).
            await asyncio.gather(asyncio.to_thread(make_shared_dir, Path(volume["spec"]["hostPath"]["path"])),
                                 self.create_volume(volume))
            await self.bind(claim, volume)
        except BaseException:
            self.answered.discard(uid)  # the next event or listing tries again
            raise

    async def create_volume(self, volume: dict[str, Any]) -> None:
        claim = volume["spec"]["claimRef"]
        try:
            await self.core.create_persistent_volume(body=volume)
            log.info("provisioned %s for claim %s/%s", volume["metadata"]["name"], claim["namespace"],
                     claim["name"])
        except ApiException as error:
            if error.status != 409:  # 409: made on an earlier pass
                raise

    async def bind(self, claim: dict[str, Any], volume: dict[str, Any]) -> None:
        """Complete the binding the controller-manager would do, with the same fields it writes.

        Its binder handles one claim at a time and fell behind bursts (binds 14 to 48 s after the volume
        existed at 20 claims/s); on finding both sides bound consistently it has nothing left to do. The
        three writes touch different objects or subresources, so they go at once: one round trip after the
        volume exists instead of three, on the path of every pod that mounts a claim.
        """
        meta, name = claim["metadata"], volume["metadata"]["name"]
        bound = {"status": {"phase": "Bound"}}
        merge = "application/merge-patch+json"
        writes = await asyncio.gather(
            self.core.patch_persistent_volume_status(name, bound, _content_type=merge),
            self.core.patch_namespaced_persistent_volume_claim(
                meta["name"], meta["namespace"],
                {"metadata": {"annotations": BIND_ANNOTATIONS}, "spec": {"volumeName": name}},
                _content_type=merge),
            self.core.patch_namespaced_persistent_volume_claim_status(
                meta["name"], meta["namespace"], bound_claim_status(volume), _content_type=merge),
            return_exceptions=True)
        for outcome in writes:
            # 404: the claim went away meanwhile; its volume is reclaimed later
            if isinstance(outcome, BaseException) and not (
                    isinstance(outcome, ApiException) and outcome.status == 404):
                raise outcome

    async def restore(self, claim: dict[str, Any]) -> None:
        """Bound again, as the controller-manager itself does once it sees the volume, if the volume is still
        there (a volume really gone leaves the claim Lost)."""
        meta = claim["metadata"]
        try:
            await self.core.read_persistent_volume(volume_name(claim))
            await self.core.patch_namespaced_persistent_volume_claim_status(
                meta["name"], meta["namespace"],
                bound_claim_status(volume_for_claim(claim, self.storage_class, self.volumes_dir)),
                _content_type="application/merge-patch+json")
        except ApiException as error:
            if error.status != 404:
                raise
            return
        log.info("claim %s/%s was marked Lost beside its volume: bound again", meta["namespace"],
                 meta["name"])

    async def on_volume(self, volume: dict[str, Any]) -> None:
        if not volume_to_delete(volume):
            return
        name = volume["metadata"]["name"]
        path = Path((volume["spec"].get("hostPath") or {}).get("path", ""))
        if path.parent == self.volumes_dir:  # never remove anything outside our own directory
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
        try:
            await self.core.delete_persistent_volume(name)
        except ApiException as error:
            if error.status != 404:
                raise
            return
        log.info("deleted released volume %s", name)


class Workers:
    """At most `limit` handlers in flight: a burst of claims is answered in parallel round trips instead
    of one after another, and the watch stops reading while all slots are busy (bounded memory)."""

    def __init__(self, limit: int) -> None:
        self.slots = asyncio.Semaphore(limit)
        self.running: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None

    async def submit(self, handle: Callable[[dict[str, Any]], Awaitable[None]], item: dict[str, Any]) -> None:
        if self.failure is not None:
            failure, self.failure = self.failure, None
            raise failure  # the caller lists everything again, which retries what failed
        await self.slots.acquire()
        task = asyncio.create_task(self._run(handle, item))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _run(self, handle: Callable[[dict[str, Any]], Awaitable[None]], item: dict[str, Any]) -> None:
        try:
            await handle(item)
        except Exception as error:
            self.failure = error
        finally:
            self.slots.release()

    async def drain(self) -> None:
        await asyncio.gather(*self.running, return_exceptions=True)


async def follow(
    list_call: Callable[..., Awaitable[Any]],
    handle: Callable[[dict[str, Any]], Awaitable[None]],
    serialize: Callable[[Any], dict[str, Any]],
    listed: asyncio.Event,
    kubeconfig: Path,
    concurrency: int = CONCURRENCY,
) -> None:
    """List, handle every object, then watch from that list; start over on any error or timeout.
    Returns when the cluster is gone (its kubeconfig deleted), so no orphan outlives it.

    kubernetes_asyncio offers a watch but no informer; this loop is the small part of one we need.
    """
    kind = list_call.__name__
    workers = Workers(concurrency)
    while True:
        try:
            listing = await list_call()
            for item in listing.items:
                await workers.submit(handle, serialize(item))
            await workers.drain()
            listed.set()
            # Events as plain dicts (what the handlers read): building client models for each was most of
            # this process's CPU under a burst.
            async with watch.Watch(return_type="object") as stream:
                async for event in stream.stream(
                    list_call,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=RESYNC_SECONDS,
                ):
                    if event["type"] in ("ADDED", "MODIFIED"):
                        await workers.submit(handle, event["raw_object"])
        except asyncio.CancelledError:
            raise
        except Exception as error:
            await workers.drain()
            if not await asyncio.to_thread(kubeconfig.exists):
                log.info("kubeconfig %s is gone with its cluster: exiting", kubeconfig)
                return
            log.warning("%s: %s; retrying in %.0f s", kind, error, RETRY_SECONDS)
            await asyncio.sleep(RETRY_SECONDS)


async def announce_ready(claims_listed: asyncio.Event, volumes_listed: asyncio.Event,
                         args: argparse.Namespace) -> None:
    await claims_listed.wait()
    await volumes_listed.wait()
    if args.ready_file:
        await asyncio.to_thread(args.ready_file.touch)
    log.info("provisioner ready: class %s, volumes under %s", args.storage_class, args.volumes_dir)


async def run(args: argparse.Namespace) -> None:
    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(args.kubeconfig), client_configuration=configuration)
    volumes_dir = args.volumes_dir.resolve()
    await asyncio.to_thread(volumes_dir.mkdir, parents=True, exist_ok=True)
    async with client.ApiClient(configuration) as api:
        skip_environment_lookups(api)
        core = client.CoreV1Api(api)
        provisioner = Provisioner(core, args.storage_class, volumes_dir)
        claims_listed, volumes_listed = asyncio.Event(), asyncio.Event()
        serialize = api.sanitize_for_serialization
        loops = [
            follow(core.list_persistent_volume_claim_for_all_namespaces, provisioner.on_claim,
                   serialize, claims_listed, args.kubeconfig),
            follow(core.list_persistent_volume, provisioner.on_volume,
                   serialize, volumes_listed, args.kubeconfig),
        ]
        tasks = [asyncio.create_task(loop) for loop in loops]
        ready = asyncio.create_task(announce_ready(claims_listed, volumes_listed, args))
        # A loop returns only when the cluster is gone: then nothing is left to do.
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in [*pending, ready]:
            task.cancel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True)
    parser.add_argument("--storage-class", default="standard")
    parser.add_argument("--volumes-dir", type=Path, required=True)
    parser.add_argument("--ready-file", type=Path, help="touched once both lists have been handled")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
