"""Whether kopf's peering lets this replica act, for the operator's own background tasks.

kopf pauses its watchers and daemons on a replica that a live peer outranks, but not tasks it did not
start (the pools' workers, the credential watch), and tells them nothing. So they read the same peering
record and apply kopf's rule: this replica is paused while a live peer has a higher priority than its
own, or while more than one live peer has its priority (kopf then pauses them all). A peer is live until
its lastseen plus its lifetime.
"""

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from agentbox.operator.kube import Kube

CHECK_SECONDS = 1.0  # a verdict is reused this long: a paused replica stops within about a second


def outranked(peers: dict[str, Any], priority: int, now: datetime) -> bool:
    """Whether kopf pauses a replica of that priority, given the peering record's status."""
    live = []
    for info in peers.values():
        if not isinstance(info, dict) or info.get("lastseen") is None:
            continue
        lastseen = datetime.fromisoformat(str(info["lastseen"]))
        if lastseen.tzinfo is None:
            lastseen = lastseen.replace(tzinfo=UTC)
        if lastseen + timedelta(seconds=int(info.get("lifetime", 60))) > now:
            live.append(int(info.get("priority", 0)))
    return any(other > priority for other in live) or live.count(priority) > 1


class Leadership:
    def __init__(self, kube: Kube, name: str | None, priority: int, clusterwide: bool) -> None:
        """`name`: the peering's, None when standalone."""
        self.kube, self.name, self.priority, self.clusterwide = kube, name, priority, clusterwide
        self._verdicts: dict[str | None, tuple[float, bool]] = {}  # namespace -> (checked at, active)

    async def active(self, namespace: str) -> bool:
        """Whether this replica may act on objects in `namespace` now."""
        if self.name is None:
            return True
        scope = None if self.clusterwide else namespace
        checked, verdict = self._verdicts.get(scope, (float("-inf"), True))
        if time.monotonic() - checked < CHECK_SECONDS:
            return verdict
        kind = "ClusterKopfPeering" if scope is None else "KopfPeering"
        record = await self.kube.get(kind, scope, self.name) or {}
        verdict = not outranked(record.get("status") or {}, self.priority, datetime.now(UTC))
        self._verdicts[scope] = (time.monotonic(), verdict)
        return verdict
