"""The dev and e2e tooling's pure parts (no cluster, no database): tokens, identities, pod stand-ins."""

from __future__ import annotations

import asyncio
from pathlib import Path

import jwt
import pytest
import session_runners
from kubernetes_asyncio import client

from e2e.stack import chart_identity, mint_token

SECRET = "s" * 48


def test_a_member_token_carries_org_and_role_in_app_metadata():
    token = mint_token.mint(SECRET, issuer="https://i.test", audience="authenticated", sub="ada", org="demo",
                            role="user", service_role=False, ttl_seconds=60)
    claims = jwt.decode(token, SECRET, algorithms=["HS256"], audience="authenticated")
    assert claims["app_metadata"] == {"org_id": "demo", "role": "user"}
    assert claims["role"] == "authenticated" and claims["exp"] - claims["iat"] == 60
    assert "user_metadata" not in claims


def test_a_service_role_token_has_no_org():
    claims = mint_token.claims(issuer="https://i.test", audience="authenticated", sub="p", org=None,
                               role=None, service_role=True, ttl_seconds=60, now=1000)
    assert claims == {"iss": "https://i.test", "aud": "authenticated", "sub": "p", "iat": 1000, "exp": 1060,
                      "role": "service_role"}


@pytest.mark.parametrize(("org", "role"), [(None, "admin"), ("demo", None), ("demo", "owner")])
def test_a_member_token_needs_an_org_and_a_known_role(org, role):
    with pytest.raises(ValueError, match="--org and --role"):
        mint_token.claims(issuer="i", audience="a", sub="s", org=org, role=role, service_role=False,
                          ttl_seconds=60)


@pytest.mark.parametrize(("release", "operator"), [("agentbox", "agentbox-operator"),
                                                   ("abx", "abx-agentbox-operator"),
                                                   ("my-agentbox", "my-agentbox-operator")])
def test_service_account_names_follow_the_charts_fullname(release, operator):
    assert chart_identity.service_account_names(release)["operator"] == operator


def test_a_token_kubeconfig_keeps_only_the_current_cluster():
    admin = {"current-context": "b",
             "contexts": [{"name": "a", "context": {"cluster": "one", "user": "x"}},
                          {"name": "b", "context": {"cluster": "two", "user": "y"}}],
             "clusters": [{"name": "one", "cluster": {"server": "https://1"}},
                          {"name": "two", "cluster": {"server": "https://2",
                                                      "certificate-authority-data": "Q0E="}}],
             "users": [{"name": "y", "user": {"client-key-data": "secret"}}]}
    config = chart_identity.token_kubeconfig(admin, "tok", "ns:sa")
    assert config["clusters"] == [{"name": "two", "cluster": {"server": "https://2",
                                                               "certificate-authority-data": "Q0E="}}]
    assert config["users"] == [{"name": "ns:sa", "user": {"token": "tok"}}]
    assert "client-key-data" not in str(config)


def test_the_gateway_config_points_at_the_local_secret_copies():
    rendered = '{"upstreams": [{"auth": {"tokenFile": "/var/run/agentbox/secrets/mcp-tools-token"}}]}'
    local = session_runners.gateway_config_for(rendered, Path("/tmp/pod/secrets"))
    assert '"/tmp/pod/secrets/mcp-tools-token"' in local


def test_the_runner_environment_comes_from_the_runner_container():
    pod = client.V1Pod(spec=client.V1PodSpec(containers=[
        client.V1Container(name="gateway", command=["python", "-m", "agentbox.sandbox.gateway"],
                           env=[client.V1EnvVar(name="AGENTBOX_GATEWAY_CONFIG", value="/etc/x")]),
        client.V1Container(name="runner", command=["python", "-m", "agentbox.sandbox.runner"],
                           env=[client.V1EnvVar(name="AGENTBOX_RUNTIME", value="scripted"),
                                client.V1EnvVar(name="FROM_SECRET", value_from=client.V1EnvVarSource())])]))
    assert session_runners.runner_env(pod) == {"AGENTBOX_RUNTIME": "scripted"}


def test_kwok_forwards_the_runner_containers_port_to_the_local_runner():
    pod = client.V1Pod(
        metadata=client.V1ObjectMeta(name="ags-s1", namespace="tenant-demo", uid="u-1"),
        spec=client.V1PodSpec(containers=[
            client.V1Container(name="gateway", command=["python", "-m", "agentbox.sandbox.gateway"],
                               ports=[client.V1ContainerPort(container_port=8090)]),
            client.V1Container(name="runner", command=["python", "-m", "agentbox.sandbox.runner"],
                               ports=[client.V1ContainerPort(container_port=3284, name="http")])]))
    forward = session_runners.port_forward(pod, 40123)
    assert forward["kind"] == "PortForward" and forward["metadata"]["name"] == "ags-s1"
    assert forward["metadata"]["ownerReferences"] == [{"apiVersion": "v1", "kind": "Pod", "name": "ags-s1",
                                                       "uid": "u-1"}]  # it goes with the pod
    target = {"address": "127.0.0.1", "port": 40123}
    assert forward["spec"]["forwards"] == [{"ports": [3284], "target": target}]
    pod.spec.containers[1].ports = None
    with pytest.raises(ValueError, match="no runner container with a port"):
        session_runners.port_forward(pod, 40123)


def test_pod_files_are_laid_out_like_the_mounts(tmp_path):
    layout = session_runners.lay_out_pod_files(
        tmp_path, {"runner-token": b"t0k", "mcp-tools-token": b"up"},
        {"system-prompt.md": "be kind",
         "gateway.json": '{"auth": {"tokenFile": "/var/run/agentbox/secrets/mcp-tools-token"}}'})
    assert (layout.secrets / "runner-token").read_bytes() == b"t0k"
    assert (layout.config / "system-prompt.md").read_text() == "be kind"
    assert str(layout.secrets / "mcp-tools-token") in layout.gateway_config.read_text()
    assert list(layout.gateway_workdir.iterdir()) == []  # nothing for its stdio servers to find there
    (layout.workspace / "kept").write_text("x")
    (layout.gateway_workdir / "left").write_text("x")
    again = session_runners.lay_out_pod_files(tmp_path, {"runner-token": b"new"}, {})
    assert (again.workspace / "kept").exists() and not (again.secrets / "mcp-tools-token").exists()
    assert list(again.gateway_workdir.iterdir()) == []


async def test_a_stand_in_waits_for_a_port_to_listen_while_it_is_worth_waiting():
    server = await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    assert await session_runners.connect_when_listening(port, lambda: False) is None  # its process died

    async def listen_soon():
        await asyncio.sleep(0.3)
        return await asyncio.start_server(lambda reader, writer: writer.close(), "127.0.0.1", port)
    opening = asyncio.create_task(listen_soon())
    connection = await session_runners.connect_when_listening(port, lambda: True)
    assert connection is not None
    connection[1].close()
    (await opening).close()


def test_a_stand_in_runner_s_exit_reads_in_the_pod_as_a_kubelet_writes_it():
    ready_since = "2026-11-26T11:00:10Z"
    status = {"conditions": [{"type": "PodScheduled", "status": "True"},
                             {"type": "Ready", "status": "True", "lastTransitionTime": ready_since},
                             {"type": "ContainersReady", "status": "True"}],
              "containerStatuses": [
                  {"name": "runner", "ready": True, "restartCount": 0, "image": "i", "imageID": "",
                   "state": {"running": {"startedAt": "2026-11-26T11:00:00Z"}}}],
              "initContainerStatuses": [{"name": "gateway", "ready": True}]}
    exited = session_runners.runner_exited(status, 77, "the agent requires authentication",
                                           "2026-11-26T12:00:00Z")
    [runner] = exited["containerStatuses"]
    assert runner["ready"] is False and runner["restartCount"] == 1
    assert runner["state"] == {"running": {"startedAt": "2026-11-26T12:00:00Z"}}
    assert runner["lastState"] == {"terminated": {
        "exitCode": 77, "reason": "Error", "message": "the agent requires authentication",
        "startedAt": "2026-11-26T11:00:00Z", "finishedAt": "2026-11-26T12:00:00Z"}}
    assert [(c["type"], c["status"]) for c in exited["conditions"]] == [
        ("PodScheduled", "True"), ("Ready", "False"), ("ContainersReady", "False")]
    again = session_runners.runner_ready_again({**status, **exited})
    assert again["containerStatuses"][0]["ready"] is True
    assert again["containerStatuses"][0]["lastState"] == runner["lastState"], "the last exit stays on record"
    assert [c["status"] for c in again["conditions"]] == ["True", "True", "True"]
