"""ClusterAgentSessionPool: keep an AgentSessionPool of its name and spec in every tenant namespace it selects
and this operator serves, delete the ones it keeps where it no longer selects, and add up their status.

One task does it for every cluster pool (not a kopf daemon: a daemon puts a finalizer on its object),
woken by the cluster pools' events, namespaces' events and the events of the pools it keeps. A pass is a
few list calls: the selected namespaces and the kept pools, read afresh, so a missed event costs nothing
beyond the next pass.
"""

import asyncio
import contextlib
import fnmatch
import logging
from collections.abc import Sequence
from typing import Any

import kopf
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from agentbox.crds import agentsessionpool, clusteragentsessionpool
from agentbox.crds.clusteragentsessionpool import ClusterAgentSessionPoolSpec
from agentbox.crds.conditions import Reason
from agentbox.operator import naming
from agentbox.operator.build.pool import kept_pool, namespace_selector
from agentbox.operator.handlers.pool import ready_condition, write_status
from agentbox.operator.kube import Conflict, Kube, api_message
from agentbox.operator.leadership import Leadership

GROUP, VERSION, PLURAL = clusteragentsessionpool.GROUP, clusteragentsessionpool.VERSION, \
    clusteragentsessionpool.PLURAL
log = logging.getLogger(__name__)
RESYNC_SECONDS = 30.0  # a pass with no event: a namespace that lost the tenant label, a refused write
# A pass waits this long after the event that woke it: the kept pools' status changes with every claim,
# and one sum a second is enough for kubectl.
COALESCE_SECONDS = 1.0

_cluster_pools: dict[str, dict[str, Any]] = {}  # name -> newest body
_worker: "ClusterPoolWorker | None" = None


def serves(patterns: Sequence[str], namespace: str) -> bool:
    """Whether the operator's namespace patterns (kopf's: globs, `!` excludes, comma lists; none: all)
    take in `namespace`."""
    terms = [term.strip() for pattern in patterns for term in pattern.split(",") if term.strip()]
    included = [term for term in terms if not term.startswith("!")]
    excluded = [term[1:] for term in terms if term.startswith("!")]
    return (not included or any(fnmatch.fnmatchcase(namespace, term) for term in included)) and \
        not any(fnmatch.fnmatchcase(namespace, term) for term in excluded)


class ClusterPoolWorker:
    def __init__(self, kube: Kube, leadership: Leadership, served: Sequence[str]) -> None:
        self.kube, self.leadership, self.served = kube, leadership, served
        self._wake = asyncio.Event()
        self.task = asyncio.create_task(self._run(), name="cluster-pools")

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), RESYNC_SECONDS)
            await asyncio.sleep(COALESCE_SECONDS)
            self._wake.clear()
            for name, body in list(_cluster_pools.items()):
                try:
                    await self._reconcile(body)
                except asyncio.CancelledError:
                    raise
                except ApiException as error:
                    log.warning("cluster pool %s: %s: %s; again at the next pass", name, error.status,
                                error.reason)
                except Exception:
                    log.exception("cluster pool %s failed; again at the next pass", name)

    async def _reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        try:
            spec = ClusterAgentSessionPoolSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:  # admission rejects this; an older CRD might not have
            await self._write_status(body, {"observedGeneration": meta.get("generation"), "conditions": [
                ready_condition(body, False, Reason.INVALID_SPEC, str(error)[:1000])]})
            return
        try:
            listed = await self.kube.list("Namespace", None, namespace_selector(spec.namespace_selector))
        except ApiException as error:
            if error.status != 400:
                raise
            await self._write_status(body, {"observedGeneration": meta.get("generation"), "conditions": [
                ready_condition(body, False, Reason.INVALID_SPEC,  # a label key of bad syntax
                                f"spec.namespaceSelector: {api_message(error)}")]})
            return
        selected = [namespace["metadata"]["name"] for namespace in listed
                    if not namespace["metadata"].get("deletionTimestamp")
                    and serves(self.served, namespace["metadata"]["name"])]
        label = f"{naming.CLUSTER_POOL_LABEL}={naming.label_value(meta['name'])}"
        kept = {pool["metadata"]["namespace"]: pool
                for pool in await self.kube.list(agentsessionpool.KIND, None, label)
                if _owned_by(pool, body) and serves(self.served, pool["metadata"]["namespace"])}
        active = [namespace for namespace in selected if await self.leadership.active(namespace)]
        results = await asyncio.gather(*(self._keep(body, spec, namespace, kept.get(namespace))
                                         for namespace in active))
        conflicts = [(namespace, result) for namespace, result in zip(active, results, strict=True)
                     if isinstance(result, Conflict)]
        gone = [pool for namespace, pool in kept.items()
                if namespace not in selected and await self.leadership.active(namespace)]
        await asyncio.gather(*(self.kube.delete(agentsessionpool.KIND, pool["metadata"]["namespace"],
                                                pool["metadata"]["name"], uid=pool["metadata"]["uid"])
                               for pool in gone))
        pools = [result for result in results if not isinstance(result, Conflict)]
        statuses = [pool.get("status") or {} for pool in pools]
        ready_pools = sum(1 for pool in pools if _ready(pool))
        if conflicts:
            condition = ready_condition(body, False, Reason.NAME_CONFLICT, "; ".join(
                f"in {namespace}: {conflict.message}" for namespace, conflict in conflicts)[:4000])
        elif ready_pools == len(pools):
            condition = ready_condition(body, True, Reason.POOLS_READY,
                                        f"the pools of {len(pools)} namespaces are ready" if pools
                                        else "no tenant namespace selected")
        else:
            condition = ready_condition(body, False, Reason.POOLS_STARTING,
                                        f"the pools of {ready_pools} of {len(pools)} namespaces are ready")
        await self._write_status(body, {
            "namespaces": len(pools), "replicas": sum(status.get("replicas") or 0 for status in statuses),
            "ready": sum(status.get("ready") or 0 for status in statuses),
            "claimed": sum(status.get("claimed") or 0 for status in statuses),
            "observedGeneration": meta.get("generation"), "conditions": [condition]})

    async def _keep(self, body: dict[str, Any], spec: ClusterAgentSessionPoolSpec, namespace: str,
                    current: dict[str, Any] | None) -> dict[str, Any] | Conflict:
        """The namespace's pool as kept (written only when it differs), or why it could not be."""
        desired = kept_pool(body, spec, namespace)
        if current is not None and (current.get("spec") or {}) == desired["spec"] and all(
                (current["metadata"].get("labels") or {}).get(key) == value
                for key, value in desired["metadata"]["labels"].items()):
            return current
        return await self.kube.ensure(desired, owner_uid=body["metadata"]["uid"], existing=current,
                                      looked_up=current is not None)

    async def _write_status(self, body: dict[str, Any], status: dict[str, Any]) -> None:
        written = await write_status(self.kube, body, status)
        name = body["metadata"]["name"]
        if written is not None and name in _cluster_pools:
            _cluster_pools[name] = written


def _owned_by(pool: dict[str, Any], cluster_pool: dict[str, Any]) -> bool:
    return any(ref.get("uid") == cluster_pool["metadata"]["uid"] and ref.get("controller")
               for ref in pool["metadata"].get("ownerReferences") or [])


def _ready(pool: dict[str, Any]) -> bool:
    conditions = (pool.get("status") or {}).get("conditions") or []
    generation = pool["metadata"].get("generation")
    return (pool.get("status") or {}).get("observedGeneration") == generation and any(
        condition["type"] == "Ready" and condition["status"] == "True" for condition in conditions)


def _wake() -> None:
    if _worker is not None and _cluster_pools:
        _worker.wake()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def cluster_pool_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    global _worker
    body = event["object"]
    if event["type"] == "DELETED":
        _cluster_pools.pop(body["metadata"]["name"], None)
        return  # its pools go with it: it owns them
    _cluster_pools[body["metadata"]["name"]] = body
    if _worker is None or _worker.task.done():
        _worker = ClusterPoolWorker(memo.kube, memo.leadership, memo.get("namespaces") or ())
    _worker.wake()


@kopf.on.event("", "v1", "namespaces")
async def cluster_pool_namespace_event(**_: Any) -> None:
    _wake()


@kopf.on.event(agentsessionpool.GROUP, agentsessionpool.VERSION, agentsessionpool.PLURAL,
               labels={naming.CLUSTER_POOL_LABEL: kopf.PRESENT})
async def kept_pool_event(**_: Any) -> None:
    _wake()
