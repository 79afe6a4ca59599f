"""MCPServer: validate, probe http/sse servers for their tools, keep status current with back-off,
and re-render the sessions that use a server whenever it changes."""

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any

import kopf
from pydantic import ValidationError

from agentbox.crds import agentsession, mcpserver
from agentbox.crds.addresses import RefusedAddress
from agentbox.crds.conditions import ConditionStatus, ConditionType, MCPServerPhase, Reason
from agentbox.crds.mcpserver import MCPServerSpec, SecretKeySelector
from agentbox.crds.naming import NEEDS_REAUTH, OAUTH_ANNOTATION
from agentbox.operator import metrics, probe
from agentbox.operator.build import mcp
from agentbox.operator.handlers.session import _or_reconcile_later, _retries, provider_key_secrets, reconcile
from agentbox.operator.kube import Kube
from agentbox.operator.later import Later
from agentbox.operator.leadership import Leadership
from agentbox.operator.settings import OperatorSettings
from agentbox.operator.status import format_time

GROUP, VERSION, PLURAL = mcpserver.GROUP, mcpserver.VERSION, mcpserver.PLURAL
log = logging.getLogger(__name__)
PROBE_TICK_SECONDS = 5.0  # the first retry after a failed probe; doubles up to mcp_backoff_max_seconds
# The newest version of every MCPServer (from the watch) and the next probe of each http/sse one: no kopf
# timer, so no finalizer that would hang a namespace deleted while the operator is down.
_servers: dict[tuple[str, str], dict[str, Any]] = {}
_probes = Later()
_failures: dict[tuple[str, str], int] = {}  # consecutive failed probes, for the back-off


async def _secret_value(kube: Kube, namespace: str, selector: SecretKeySelector) -> str | None:
    secret = await kube.get("Secret", namespace, selector.name)
    encoded = ((secret or {}).get("data") or {}).get(selector.key)
    return base64.b64decode(encoded).decode() if encoded is not None else None


async def _probe(kube: Kube, namespace: str, spec: MCPServerSpec,
                 allow_private: bool) -> tuple[list[dict[str, str]] | None, Reason, str]:
    """(tools, ProbeSucceeded, "") on success, (None, the reason, why) on failure."""
    token = None
    if spec.auth.secret_ref is not None:
        token = await _secret_value(kube, namespace, spec.auth.secret_ref)
        if token is None:
            return None, Reason.PROBE_FAILED, (f"Secret {spec.auth.secret_ref.name} key "
                                               f"{spec.auth.secret_ref.key} not found")
    headers = {}
    for header in spec.headers:
        if header.value_from is None:
            headers[header.name] = header.value or ""
            continue
        value = await _secret_value(kube, namespace, header.value_from.secret_key_ref)
        if value is None:
            return None, Reason.PROBE_FAILED, f"Secret for header {header.name} not found"
        headers[header.name] = value
    try:
        tools = await probe.list_tools(spec, token, headers, allow_private=allow_private)
        return tools, Reason.PROBE_SUCCEEDED, ""
    except RefusedAddress as error:  # nothing was sent: says so, and which kind of address
        return None, Reason.ADDRESS_REFUSED, f"not probed: the host {error}"
    except Exception as error:  # any transport, protocol or timeout failure means "unreachable"
        return None, Reason.PROBE_FAILED, f"{type(error).__name__}: {error}"[:1024] or type(error).__name__


def _authorized(previous: dict[str, Any] | None, annotations: dict[str, str],
                now: str) -> dict[str, Any] | None:
    """The API's Authorized condition, kept across our writes; the needs-reauth annotation (which the API
    sets first) makes it False even when the condition write lost a race with ours."""
    if annotations.get(OAUTH_ANNOTATION) != NEEDS_REAUTH or (previous or {}).get("status") == "False":
        return previous
    return {"type": str(ConditionType.AUTHORIZED), "status": str(ConditionStatus.FALSE),
            "reason": str(Reason.NEEDS_REAUTHORIZATION),
            "message": "the OAuth grant no longer holds: authorise the server again",
            "lastTransitionTime": now}


def _status(phase: MCPServerPhase, reason: Reason, message: str, generation: int,
            previous: dict[str, Any], tools: list[dict[str, str]] | None, probed: bool,
            annotations: dict[str, str] | None = None) -> dict[str, Any]:
    """The whole status; conditions the operator does not own (Authorized, ...) are carried over, since a
    merge patch replaces the list."""
    now = format_time(datetime.now(UTC))
    ready = ConditionStatus.TRUE if phase == MCPServerPhase.READY else ConditionStatus.FALSE
    kept = {c.get("type"): c for c in previous.get("conditions") or []
            if c.get("type") != ConditionType.READY}
    before = next((c for c in previous.get("conditions") or [] if c.get("type") == ConditionType.READY), {})
    unchanged = before.get("status") == ready and before.get("lastTransitionTime")
    condition = {"type": str(ConditionType.READY), "status": str(ready), "reason": str(reason),
                 "message": message, "observedGeneration": generation,
                 "lastTransitionTime": before["lastTransitionTime"] if unchanged else now}
    authorized = _authorized(kept.pop(ConditionType.AUTHORIZED, None), annotations or {}, now)
    others = [*kept.values(), *([authorized] if authorized else [])]
    status: dict[str, Any] = {"phase": str(phase), "conditions": [condition, *others],
                              "observedGeneration": generation}
    if tools is not None:
        status.update(tools=tools, toolCount=len(tools))
    if probed:
        status["lastProbeTime"] = now
    return status


def _schedule_probe(kube: Kube, key: tuple[str, str], delay: float, settings: OperatorSettings) -> None:
    """Re-probe when due: every mcp_probe_seconds when healthy, exponential back-off when not."""
    async def probe_again() -> None:
        body = _servers.get(key)
        if body is not None:
            await check(kube, body, settings)

    _probes.schedule(key, delay, probe_again)


async def check(kube: Kube, body: dict[str, Any], settings: OperatorSettings) -> None:
    """Validate and (for http/sse) probe one MCPServer; write its status; schedule the next probe."""
    meta = body["metadata"]
    namespace, generation = meta["namespace"], meta.get("generation", 0)
    previous = body.get("status") or {}
    annotations = meta.get("annotations") or {}
    async with metrics.reconciling("mcpserver"):
        _probes.cancel((namespace, meta["name"]))  # rescheduled below when the server is probed
        try:
            spec = MCPServerSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            status = _status(MCPServerPhase.INVALID, Reason.INVALID_SPEC, str(error)[:4096], generation,
                             previous, [], probed=False, annotations=annotations)
        else:
            if spec.transport == "stdio":
                status = _status(MCPServerPhase.READY, Reason.STDIO_NOT_PROBED,
                                 "stdio server: started by each session's gateway, not probed", generation,
                                 previous, [], probed=False, annotations=annotations)
            else:
                tools, reason, why = await _probe(kube, namespace, spec,
                                                  settings.mcp_probe_allow_private_networks)
                key = (namespace, meta["name"])
                failures = 0 if tools is not None else _failures.get(key, 0) + 1
                _failures[key] = failures
                delay = (settings.mcp_probe_seconds if tools is not None
                         else min(PROBE_TICK_SECONDS * 2 ** (failures - 1), settings.mcp_backoff_max_seconds))
                _schedule_probe(kube, key, delay, settings)
                status = (_status(MCPServerPhase.READY, Reason.PROBE_SUCCEEDED, f"{len(tools)} tool(s)",
                                  generation, previous, tools, probed=True, annotations=annotations)
                      if tools is not None else
                          _status(MCPServerPhase.UNREACHABLE, reason,
                                  f"{why} (retry in {delay:.0f}s)", generation, previous, None, probed=True,
                                  annotations=annotations))
        await kube.merge_patch(mcpserver.KIND, namespace, meta["name"], {"status": status}, sub="status")
        if previous.get("phase") != status["phase"]:
            post = kopf.info if status["phase"] == MCPServerPhase.READY else kopf.warn
            condition = status["conditions"][0]
            post(body, reason=condition["reason"], message=condition["message"])


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def mcpserver_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await check(memo.kube, dict(body), memo.settings)


@kopf.index(agentsession.GROUP, agentsession.VERSION, agentsession.PLURAL)
def sessions_by_mcpserver(namespace: str, name: str, uid: str, spec: kopf.Spec,
                          **_: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """(namespace, MCPServer) -> the sessions using it, each as a reconcile's owner (its identity)."""
    owner = {"metadata": {"namespace": namespace, "name": name, "uid": uid}}
    return {(namespace, ref["name"]): owner for ref in spec.get("mcpServers") or []}


async def reconcile_each(kube: Kube, settings: OperatorSettings, sessions: list[dict[str, Any]]) -> None:
    """Reconcile every session (bodies, or owners: their namespace, name and uid) on its own: one that fails
    is reconciled again later by the session handlers' retry, and the others do not wait for it. An invalid
    spec is on the session's status already, with nothing to retry until it changes."""
    for session in sessions:
        with contextlib.suppress(kopf.PermanentError):
            await _or_reconcile_later(_retries, kube, settings, session, reconcile(kube, settings, session))


@kopf.on.event(GROUP, VERSION, PLURAL)
async def mcpserver_event(event: kopf.RawEvent, memo: kopf.Memo, sessions_by_mcpserver: kopf.Index,
                          **_: Any) -> None:
    """Sessions re-render when a server they use changes spec, readiness, or disappears."""
    server = event["object"]
    meta = server["metadata"]
    key = (meta["namespace"], meta["name"])
    if event["type"] == "DELETED":
        memo.handled.forget(meta["uid"])
        _servers.pop(key, None)
        _failures.pop(key, None)
        _probes.cancel(key)
    else:
        _servers[key] = server
    phase = (server.get("status") or {}).get("phase")
    fingerprint = (event["type"] == "DELETED", meta.get("generation"), phase)
    if getattr(memo, "fingerprint", None) == fingerprint:
        return
    first_sight = not hasattr(memo, "fingerprint")
    memo.fingerprint = fingerprint
    if first_sight and event["type"] is None:
        return  # the initial listing: sessions get their own resume reconciliation
    await reconcile_each(memo.kube, memo.settings, list(sessions_by_mcpserver.get(key, [])))


def _digest(secret: dict[str, Any] | None) -> str | None:
    if secret is None:
        return None
    return hashlib.sha256(json.dumps(secret.get("data") or {}, sort_keys=True).encode()).hexdigest()


def referenced_secrets() -> dict[tuple[str, str], list[str]]:
    """(namespace, Secret) -> the MCPServers reading credentials from it."""
    servers_by_secret: dict[tuple[str, str], list[str]] = {}
    for (namespace, name), body in _servers.items():
        for secret in mcp.referenced_secrets({name: body}):
            servers_by_secret.setdefault((namespace, secret), []).append(name)
    return servers_by_secret


async def credentials_changed(kube: Kube, settings: OperatorSettings, namespace: str,
                              servers: list[str]) -> None:
    """Roll the pods of the sessions using these servers (their config hash covers the credentials) and
    re-probe the servers."""
    sessions = await kube.list(agentsession.KIND, namespace)
    await reconcile_each(kube, settings, [
        session for session in sessions
        if {ref.get("name") for ref in (session.get("spec") or {}).get("mcpServers") or []} & set(servers)])
    for server in servers:
        if (namespace, server) in _servers:
            await check(kube, _servers[(namespace, server)], settings)


async def secret_changed(kube: Kube, settings: OperatorSettings, namespace: str, servers: list[str],
                         sessions: list[str]) -> None:
    """A Secret changed: the MCPServers reading credentials from it, and the sessions whose provider key it
    holds (their pods roll: the config hash covers the key they copied)."""
    if servers:
        await credentials_changed(kube, settings, namespace, servers)
    bodies = await asyncio.gather(*(kube.get(agentsession.KIND, namespace, name) for name in sessions))
    await reconcile_each(kube, settings, [body for body in bodies if body is not None])


async def watch_credentials(kube: Kube, settings: OperatorSettings, leadership: Leadership) -> None:
    """Re-read every Secret an MCPServer or a session's provider key references each secret_check_seconds;
    act on changed data (a session's pod rolls: its config hash covers the key it copied). A replica that
    peering pauses skips the namespaces it may not act in (a Secret seen again after that counts as changed).

    Polling with `get` rather than a Secret watch: a watch needs list/watch on every Secret of the
    cluster, which the chart does not grant (least privilege); the referenced Secrets are few."""
    digests: dict[tuple[str, str], str | None] = {}
    limit = asyncio.Semaphore(8)
    # A Secret first seen after the first pass may have changed since a session rendered it: treat it as
    # changed (a reconcile rolls nothing when the rendered hash is the same). The first pass runs at
    # once, before kopf has listed any MCPServer, so no change can slip in before the baseline.
    started = False  # a first baseline was taken

    async def read(key: tuple[str, str]) -> str | None:
        async with limit:
            return _digest(await kube.get("Secret", *key))

    first_pass = True
    while True:
        if not first_pass:
            await asyncio.sleep(settings.secret_check_seconds)
        first_pass = False
        try:
            wanted, keyed = referenced_secrets(), provider_key_secrets()
            keys = [key for key in {*wanted, *keyed} if await leadership.active(key[0])]
            found = dict(zip(keys, await asyncio.gather(*(read(key) for key in keys)), strict=True))
            acted: dict[tuple[str, str], str | None] = {}  # the digests acted on: the next pass's baseline
            for key, digest in found.items():
                if (key in digests and digests[key] != digest) or (started and key not in digests):
                    try:
                        await secret_changed(kube, settings, key[0], wanted.get(key, []), keyed.get(key, []))
                    except Exception:  # this Secret's change counts as unseen: the next pass acts again
                        log.exception("acting on a change of Secret %s/%s failed", *key)
                        if key in digests:
                            acted[key] = digests[key]
                        continue
                acted[key] = digest
            digests, started = acted, True
        except Exception:  # one failed pass must not end the loop: the next pass compares again
            log.exception("checking referenced Secrets failed")
