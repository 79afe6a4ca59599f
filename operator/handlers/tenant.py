"""Tenant namespaces (labelled agentbox.dev/tenant): Pod Security "restricted", quota, limit range, a
default-deny NetworkPolicy with DNS egress, and the RoleBinding that lets the API in."""

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
        baseline = [tenant.build_quota(name, settings.tenant_quota), tenant.build_limit_range(name),
                    tenant.build_default_deny(name)]
        if settings.api_tenant_role:
            baseline.append(tenant.build_api_binding(name, settings.api_tenant_role,
                                                     settings.api_service_account, settings.api_namespace))
        results = await asyncio.gather(*(kube.ensure(manifest, owner_uid=None) for manifest in baseline))
        conflicts = [result for result in results if isinstance(result, Conflict)]
        for conflict in conflicts:
            kopf.warn(body, reason="NameConflict", message=conflict.message)
        if not conflicts:
            access = ", API access" if settings.api_tenant_role else ""
            kopf.info(body, reason="TenantBaselineApplied", message="pod security restricted, quota, limit "
                      f"range, default-deny policy{access} in place")


@kopf.on.event("", "v1", "namespaces", labels={naming.TENANT_LABEL: kopf.PRESENT})
async def tenant_namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    meta = event["object"]["metadata"]
    if event["type"] == "DELETED":
        memo.handled.forget(meta["uid"])
    elif meta.get("deletionTimestamp"):
        await session.let_go_in(memo.kube, meta["name"])
