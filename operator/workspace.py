"""Whether a session's pod goes out at once or waits for its workspace claim to bind.

A claim whose StorageClass binds it on its own (volumeBindingMode Immediate, or no class at all) is bound
without any pod. A pod created before that is turned away by the scheduler (a FailedScheduling event and
a pod status write) and tried again only after a backoff: such a pod waits for the claim instead. A
WaitForFirstConsumer claim binds only once a pod is scheduled, so its pod goes at once; so does the pod of
a claim whose class cannot be read (the scheduler then reports what is wrong).
"""

import logging
import time
from typing import Any

from kubernetes_asyncio.client.exceptions import ApiException

from agentbox.operator.kube import Kube

log = logging.getLogger(__name__)

IMMEDIATE = "Immediate"
# A class's binding mode is immutable; it changes only when the class is deleted and made again.
MODE_TTL_SECONDS = 300.0

_modes: dict[str, tuple[str | None, float]] = {}


def claim_bound(claim: dict[str, Any]) -> bool:
    return (claim.get("status") or {}).get("phase") == "Bound"


async def binding_mode(kube: Kube, storage_class: str | None) -> str | None:
    """The class's volumeBindingMode; None when it cannot be read. No class: the PV controller binds
    the claim to a matching volume by itself, as Immediate does."""
    if not storage_class:
        return IMMEDIATE
    known = _modes.get(storage_class)
    if known is not None and time.monotonic() < known[1]:
        return known[0]
    mode: str | None
    try:
        found = await kube.get("StorageClass", None, storage_class)
        mode = None if found is None else found.get("volumeBindingMode") or IMMEDIATE
    except ApiException as error:
        # Waiting is only a saving: without the class, pods go at once.
        log.warning("could not read StorageClass %s (%s %s): its sandbox pods are created beside their "
                    "claims", storage_class, error.status, error.reason)
        if error.status >= 500:
            return None  # asked again next time
        mode = None
    _modes[storage_class] = (mode, time.monotonic() + MODE_TTL_SECONDS)
    return mode


async def pod_waits_for(kube: Kube, claim: dict[str, Any]) -> bool:
    """An unbound claim that binds without the pod: the pod is created once it has."""
    if claim_bound(claim):
        return False
    return await binding_mode(kube, (claim.get("spec") or {}).get("storageClassName")) == IMMEDIATE
