"""Sessions re-rendered for an MCPServer or a Secret each on their own (pure, no cluster): one session whose
reconcile fails neither stops the others nor goes without the session handlers' retry."""

import asyncio
import base64
from types import SimpleNamespace
from typing import Any

import kopf
import pytest

from agentbox.crds import agentsession
from agentbox.operator.handlers import mcpserver, session
from agentbox.operator.settings import OperatorSettings

NAMESPACE = "tenant-acme"
SETTINGS = OperatorSettings(secret_check_seconds=0.05)


def session_body(name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": agentsession.API_VERSION, "kind": agentsession.KIND,
            "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"}, "spec": spec}


class FakeKube:
    def __init__(self, sessions: list[dict[str, Any]]) -> None:
        self.sessions = {body["metadata"]["name"]: body for body in sessions}
        self.secret_data = {"token": base64.b64encode(b"old").decode()}

    async def list(self, kind: str, namespace: str | None, label_selector: str = "") -> list[dict[str, Any]]:
        assert kind == agentsession.KIND
        return list(self.sessions.values())

    async def get(self, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        if kind == "Secret":
            return {"metadata": {"name": name, "namespace": namespace}, "data": dict(self.secret_data)}
        return self.sessions.get(name)


class AlwaysActive:
    async def active(self, namespace: str) -> bool:
        return True


@pytest.fixture
def reconciled(monkeypatch):
    """Session names in the order reconciled; the first, "broken", fails as a missing key does."""
    seen: list[str] = []

    async def reconcile(kube, settings, body):
        seen.append(body["metadata"]["name"])
        if body["metadata"]["name"] == "broken":
            raise session.ProviderKeyMissingError("no key yet", delay=600)
        return {}

    monkeypatch.setattr(mcpserver, "reconcile", reconcile)
    monkeypatch.setattr(session, "reconcile", reconcile)
    yield seen
    session._retries.cancel((NAMESPACE, "broken"))


async def test_a_failing_session_neither_stops_the_others_nor_goes_without_a_retry(reconciled):
    users = [session_body(name, mcpServers=[{"name": "tools"}]) for name in ("broken", "ada", "bob")]
    await mcpserver.credentials_changed(FakeKube(users), SETTINGS, NAMESPACE, ["tools"])
    assert reconciled == ["broken", "ada", "bob"]
    assert session._retries.pending((NAMESPACE, "broken"))


async def test_a_changed_provider_key_reaches_every_session_and_a_failure_is_retried(reconciled, monkeypatch):
    users = [session_body(name) for name in ("broken", "ada")]
    monkeypatch.setattr(mcpserver, "referenced_secrets", dict)
    monkeypatch.setattr(mcpserver, "provider_key_secrets", lambda: {(NAMESPACE, "key"): ["broken", "ada"]})
    kube = FakeKube(users)
    watch = asyncio.create_task(mcpserver.watch_credentials(kube, SETTINGS, AlwaysActive()))
    try:
        await asyncio.sleep(SETTINGS.secret_check_seconds * 3)  # the baseline
        kube.secret_data = {"token": base64.b64encode(b"new").decode()}
        await asyncio.sleep(SETTINGS.secret_check_seconds * 6)  # the change, and passes after it
    finally:
        watch.cancel()
    assert reconciled == ["broken", "ada"]  # once each: the change was acted on
    assert session._retries.pending((NAMESPACE, "broken"))


async def test_a_changed_credential_reaches_every_session_of_its_servers_once(reconciled, monkeypatch):
    users = [session_body(name, mcpServers=[{"name": "tools"}]) for name in ("broken", "ada")]
    monkeypatch.setattr(mcpserver, "referenced_secrets", lambda: {(NAMESPACE, "cred"): ["tools"]})
    monkeypatch.setattr(mcpserver, "provider_key_secrets", dict)
    kube = FakeKube(users)
    watch = asyncio.create_task(mcpserver.watch_credentials(kube, SETTINGS, AlwaysActive()))
    try:
        await asyncio.sleep(SETTINGS.secret_check_seconds * 3)
        kube.secret_data = {"token": base64.b64encode(b"new").decode()}
        await asyncio.sleep(SETTINGS.secret_check_seconds * 6)
    finally:
        watch.cancel()
    assert reconciled == ["broken", "ada"]
    assert session._retries.pending((NAMESPACE, "broken"))


def test_the_index_names_each_session_by_its_identity():
    index = mcpserver.sessions_by_mcpserver(namespace=NAMESPACE, name="ada", uid="uid-ada",
                                            spec=kopf.Spec({"spec": {"mcpServers": [{"name": "tools"}]}}))
    assert index == {(NAMESPACE, "tools"): {"metadata": {"namespace": NAMESPACE, "name": "ada",
                                                          "uid": "uid-ada"}}}


async def test_a_server_that_changes_re_renders_every_session_using_it(reconciled):
    server = {"metadata": {"name": "tools", "namespace": NAMESPACE, "uid": "uid-tools", "generation": 2},
              "status": {"phase": "Ready"}}
    memo = SimpleNamespace(kube=FakeKube([]), settings=SETTINGS, fingerprint=(False, 1, "Ready"))
    users = [{"metadata": {"namespace": NAMESPACE, "name": name, "uid": f"uid-{name}"}}
             for name in ("broken", "ada")]
    await mcpserver.mcpserver_event(event={"type": "MODIFIED", "object": server}, memo=memo,
                                    sessions_by_mcpserver={(NAMESPACE, "tools"): users})
    assert reconciled == ["broken", "ada"]
    assert session._retries.pending((NAMESPACE, "broken"))
    mcpserver._servers.clear()
