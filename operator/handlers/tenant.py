"""Tenant namespaces (labelled agentbox.dev/tenant): Pod Security "restricted", quota, limit range and a
default-deny NetworkPolicy with DNS egress."""

import asyncio
from typing import Any

import kopf

from agentbox.operator import metrics, naming
from agentbox.operator.build import tenant
from agentbox.operator.handlers import session
from agentbox.operator.kube import Conflict


@kopf.on.resume("", "v1", "namespaces", labels={naming.TENANT_LABEL: kopf.PRESENT})
@kopf.on.create("", "v1", "namespaces", labels={naming.TENANT_LABEL: kopf.PRESENT})
@kopf.on.update("", "v1", "namespaces", labels={naming.TENANT_LABEL: kopf.PRESENT})
async def tenant_namespace(body: kopf.Body, name: str, memo: kopf.Memo, **_: Any) -> None:
    kube, settings = memo.kube, memo.settings
    async with metrics.reconciling("tenant"):
        await kube.apply(tenant.build_namespace_labels(name))
        results = await asyncio.gather(
            kube.ensure(tenant.build_quota(name, settings.tenant_quota), owner_uid=None),
            kube.ensure(tenant.build_limit_range(name), owner_uid=None),
            kube.ensure(tenant.build_default_deny(name), owner_uid=None))
        conflicts = [result for result in results if isinstance(result, Conflict)]
        for conflict in conflicts:
            kopf.warn(body, reason="NameConflict", message=conflict.message)
        if not conflicts:
            kopf.info(body, reason="TenantBaselineApplied",
                      message="pod security restricted, quota, limit range and default-deny policy in place")


@kopf.on.event("", "v1", "namespaces", labels={naming.TENANT_LABEL: kopf.PRESENT})
async def tenant_namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    meta = event["object"]["metadata"]
    if event["type"] == "DELETED":
        memo.handled.forget(meta["uid"])
    elif meta.get("deletionTimestamp"):
        await session.let_go_in(memo.kube, meta["name"])
