"""A list+watch cache of one custom resource across all namespaces, so reads do not go to the API server.

    cache = WatchCache(kube.custom, agentsession.GROUP, agentsession.VERSION, agentsession.PLURAL)
    task = asyncio.create_task(cache.run())
    cache.synced            # True once the first list arrived, and again after every resync
    cache.items(namespace)  # the objects of one namespace (dicts as the API server sends them)
    cache.observe(obj)      # the API's own write, seen at once (read-your-writes)

The first list sets `synced`; the watch then continues from the list's resourceVersion. When the watch
ends (its server-side timeout) it resumes from the last version seen; when the version is too old (410
Gone) or the connection fails, the cache is marked unsynced and lists again, so readers fall back to live
reads meanwhile. kubernetes_asyncio's Watch does the streaming; the store and the resync are ours (the
library has no informer).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import watch
from kubernetes_asyncio.client import CustomObjectsApi
from kubernetes_asyncio.client.exceptions import ApiException

log = logging.getLogger("agentbox.api.cache")
Object = dict[str, Any]


def _newer(incoming: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """Whether `incoming` may replace `current`. resourceVersions are opaque in general, but etcd's are
    increasing integers; comparing them keeps a late watch event from undoing the API's own newer write."""
    if current is None:
        return True
    try:
        return int(incoming["metadata"]["resourceVersion"]) >= int(current["metadata"]["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return True


class WatchCache:
    def __init__(self, custom: CustomObjectsApi, group: str, version: str, plural: str, *,
                 watch_seconds: int = 300, retry_seconds: float = 1.0, request_timeout: float = 30) -> None:
        self.custom = custom
        self.group, self.version, self.plural = group, version, plural
        self.watch_seconds = watch_seconds
        self.retry_seconds = retry_seconds
        self.request_timeout = request_timeout
        self._objects: dict[str, dict[str, Object]] = {}  # namespace -> name -> object
        self._synced = asyncio.Event()
        self.resyncs = 0  # full lists done (the first included)

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        await self._synced.wait()

    def items(self, namespace: str) -> list[Object]:
        return list(self._objects.get(namespace, {}).values())

    def get(self, namespace: str, name: str) -> Object | None:
        return self._objects.get(namespace, {}).get(name)

    def observe(self, obj: Object) -> None:
        """A version of an object: from the watch, or the API's own write (create, patch), which reads
        then see before its watch event arrives."""
        metadata = obj["metadata"]
        namespace = self._objects.setdefault(metadata["namespace"], {})
        if _newer(obj, namespace.get(metadata["name"])):
            namespace[metadata["name"]] = obj

    def forget(self, namespace: str, name: str) -> None:
        """An object the API itself just deleted."""
        self._objects.get(namespace, {}).pop(name, None)

    async def run(self) -> None:
        """List, then watch, forever (cancel the task to stop)."""
        while True:
            try:
                version = await self._list()
                while version is not None:
                    version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status != 410:
                    log.warning("the %s watch failed (%s %s); listing again", self.plural, exc.status,
                                exc.reason)
                    await asyncio.sleep(self.retry_seconds)
            except Exception:  # a dropped connection, a timeout: list again after a pause
                log.warning("the %s watch broke; listing again", self.plural, exc_info=True)
                await asyncio.sleep(self.retry_seconds)
            self._synced.clear()

    async def _list(self) -> str:
        listed = await self.custom.list_cluster_custom_object(self.group, self.version, self.plural,
                                                              _request_timeout=self.request_timeout)
        objects: dict[str, dict[str, Object]] = {}
        for obj in listed.get("items", []):
            objects.setdefault(obj["metadata"]["namespace"], {})[obj["metadata"]["name"]] = obj
        self._objects = objects
        self.resyncs += 1
        self._synced.set()
        return listed["metadata"]["resourceVersion"]

    async def _watch(self, version: str) -> str | None:
        """One watch request from `version`; the version to resume from when it ends normally."""
        stream = watch.Watch()
        try:
            events = stream.stream(self.custom.list_cluster_custom_object, self.group, self.version,
                                   self.plural, resource_version=version, allow_watch_bookmarks=True,
                                   timeout_seconds=self.watch_seconds,
                                   _request_timeout=self.watch_seconds + 30)
            async for event in events:
                self._apply(event["type"], event["raw_object"])
        finally:
            await stream.close()
        return stream.resource_version or version

    def _apply(self, kind: str, obj: Object) -> None:
        if kind in ("ADDED", "MODIFIED"):
            self.observe(obj)
        elif kind == "DELETED":
            self.forget(obj["metadata"]["namespace"], obj["metadata"]["name"])
