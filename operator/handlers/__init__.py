"""Importing this package registers every kopf handler of the operator."""

from typing import Any

import kopf

from agentbox.operator import metrics
from agentbox.operator.handlers import mcpserver, session, tenant
from agentbox.operator.kube import Kube
from agentbox.operator.settings import OperatorSettings, configure_kopf

__all__ = ["mcpserver", "session", "tenant"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    configure_kopf(settings)
    memo.settings = OperatorSettings()
    memo.kube = await Kube.connect()
    metrics.serve(memo.settings.metrics_host, memo.settings.metrics_port)
    if not settings.peering.standalone and settings.peering.clusterwide:
        await ensure_peering(memo.kube, settings.peering.name)


async def ensure_peering(kube: Kube, name: str) -> None:
    """The peering object replicas meet in; created by whichever replica starts first."""
    if await kube.get("ClusterKopfPeering", None, name) is None:
        await kube.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                           "metadata": {"name": name}})


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    kube = getattr(memo, "kube", None)
    if kube is not None:
        await kube.close()
