"""Importing this package registers every kopf handler of the operator."""

import asyncio
import dataclasses
import os
import ssl
from typing import Any

import aiohttp
import kopf

from agentbox.operator import metrics
from agentbox.operator.handlers import cluster_pool, mcpserver, pool, session, tenant
from agentbox.operator.kube import CONNECTIONS, Kube
from agentbox.operator.leadership import Leadership
from agentbox.operator.settings import OperatorSettings, configure_kopf

__all__ = ["cluster_pool", "mcpserver", "pool", "session", "tenant"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    memo.settings = OperatorSettings()
    configure_kopf(settings, memo.settings)
    memo.handled = settings.persistence.diffbase_storage  # forgotten object by object as they are deleted
    memo.kube = await Kube.connect()
    memo.leadership = Leadership(memo.kube, None if settings.peering.standalone else settings.peering.name,
                                 settings.peering.priority, settings.peering.clusterwide)
    metrics.serve(memo.settings.metrics_host, memo.settings.metrics_port)
    memo.credential_watch = asyncio.create_task(mcpserver.watch_credentials(memo.kube, memo.settings,
                                                                                memo.leadership))
    if not settings.peering.standalone and settings.peering.clusterwide:
        await ensure_peering(memo.kube, settings.peering.name)


async def ensure_peering(kube: Kube, name: str) -> None:
    """The peering object replicas meet in; created by whichever replica starts first."""
    if await kube.get("ClusterKopfPeering", None, name) is None:
        await kube.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering",
                           "metadata": {"name": name}})


def _credentials(settings: kopf.OperatorSettings,
                 **kwargs: Any) -> tuple[kopf.ConnectionInfo, ssl.SSLContext]:
    info = (kopf.login_with_service_account(settings=settings, **kwargs)
            or kopf.login_with_kubeconfig(settings=settings, **kwargs))
    if info is None:
        raise kopf.LoginError("neither a service account nor a kubeconfig was found")
    host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
    if info.server == "https://kubernetes.default.svc" and host and port:
        # The address kubernetes_asyncio uses too (no DNS lookup; the chart's egress policy names it).
        info = dataclasses.replace(info, server=f"https://{host}:{port}")
    return info, info.as_ssl_context()


@kopf.on.login()
async def login(settings: kopf.OperatorSettings, **kwargs: Any) -> kopf.AiohttpSession:
    """kopf's own credentials on a connection pool of bounded size: kopf's default pool is unbounded, and
    every TLS connection holds a 256 KiB read buffer (a burst opened ~300 of them: 38 MB). Served
    namespace by namespace, kopf holds three watch connections per namespace for as long as it runs, so
    no fixed bound fits: that mode keeps kopf's unbounded pool."""
    info, context = await asyncio.to_thread(_credentials, settings, **kwargs)  # reads files
    limit = CONNECTIONS if settings.peering.clusterwide else 0  # aiohttp: 0 means no limit
    connector = aiohttp.TCPConnector(limit=limit, ssl=context)
    session = aiohttp.ClientSession(connector=connector, headers=info.as_http_headers())
    return kopf.AiohttpSession(server=info.server, default_namespace=info.default_namespace,
                               aiohttp_session=session)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    watch = getattr(memo, "credential_watch", None)
    if watch is not None:
        watch.cancel()
    kube = getattr(memo, "kube", None)
    if kube is not None:
        await kube.close()
