"""Sessions as real containers on the real node (AGENTBOX_REAL_NODE=1: hack/real-node.sh): the pod the
operator renders runs under PSS restricted, the runner answers through port-forward and through its
Service, the gateway container serves the demo tool, and NetworkPolicy is enforced (kube-router).

An operator of its own serves these tests' tenants (t-rn-*), with the control-plane namespace set to one
the tests make, so a client pod there stands in for the API inside the cluster."""

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import pytest_asyncio
from fixtures.cluster import REAL_NODE_PLACEMENT, REPO, TEST_NAMESPACE_LABEL
from fixtures.polling import eventually
from fixtures.real_pods import IDENTITY, WORKSPACE_WRITE, restricted_identity, run_python, saying_state
from kubernetes_asyncio.client.exceptions import ApiException
from operator_harness import (
    OperatorProcess,
    finalizers_released,
    mcpserver_manifest,
    session_in_phase,
    session_manifest,
)

from agentbox.api.portforward import PortForwarder
from agentbox.operator import naming
from agentbox.operator.build.pod import SANDBOX_UID, container_security_context
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY
from agentbox.operator.kube import Kube as OperatorKube
from agentbox.operator.settings import OperatorSettings

# Generous for a loaded machine (two cores, a CI run beside): a wait that runs out says what it saw.
pytestmark = [pytest.mark.cluster, pytest.mark.realnode, pytest.mark.timeout(900)]

SCOPE = "t-rn-*"
DEFAULTS = OperatorSettings()
# A real pod's start: image already local, but two Python processes on two busy cores.
START_SECONDS = 180
# kube-router programs a new pod's policy a few seconds after the pod starts; far longer under load.
POLICY_SECONDS = 120

# GET argv[1] with a timeout; the status and body, or the error. A body is checked, not just a connect.
# Straight to the address (what the NetworkPolicy decides), unless argv[2] is "proxy": then through the
# session's egress proxy, as the pod's HTTPS_PROXY says.
FETCH = """
import json, sys, urllib.error, urllib.request
direct = [] if sys.argv[2:] == ["proxy"] else [urllib.request.ProxyHandler({})]
opener = urllib.request.build_opener(*direct)
try:
    with opener.open(sys.argv[1], timeout=3) as response:
        print(json.dumps({"status": response.status, "body": response.read().decode()}))
except urllib.error.HTTPError as error:
    print(json.dumps({"status": error.code, "body": error.read().decode()}))
except Exception as error:
    print(json.dumps({"error": f"{type(error).__name__}: {error}"}))
"""
RESOLVE = """
import json, socket, sys
try:
    print(json.dumps(sorted({info[4][0] for info in socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET)})))
except OSError as error:
    print(json.dumps({"error": str(error)}))
"""
CATATONIT = "/usr/bin/catatonit"  # static, from Debian (hack/real-node.sh installs it for the pause image)
READY = {"status": 200, "body": json.dumps({"agent": "ready"}, separators=(",", ":"))}


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api_namespace(kube) -> AsyncIterator[str]:
    """Where the operator believes the API runs: session policies admit pods labelled like it from here."""
    name = f"t-rnapi-{os.urandom(3).hex()}"
    async with kube.api_client() as api:
        ops = OperatorKube(api)
        await ops.create({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": name, "labels": {TEST_NAMESPACE_LABEL: "true"}}})
        await kube.wait_for_default_account(name)
        yield name
        with contextlib.suppress(ApiException):
            await ops.delete("Namespace", None, name)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def real_operator(kube, real_node, api_namespace, tmp_path_factory) -> AsyncIterator[OperatorProcess]:
    process = OperatorProcess(str(kube.kubeconfig), str(tmp_path_factory.mktemp("operator") / "operator.log"),
                              scope=SCOPE, env={"AGENTBOX_API_NAMESPACE": api_namespace})
    process.start()
    await process.wait_alive()
    try:
        yield process
        await finalizers_released(kube, scope=SCOPE)
    finally:
        process.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def tenants(kube, ops) -> AsyncIterator[Callable[[], Awaitable[str]]]:
    """Makes tenant namespaces in this module's operator's scope."""
    made: list[str] = []

    async def make() -> str:
        name = f"t-rn-{os.urandom(3).hex()}"
        labels = {"agentbox.dev/tenant": name.removeprefix("t-"), TEST_NAMESPACE_LABEL: "true"}
        await ops.create({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": name, "labels": labels}})
        await kube.wait_for_default_account(name)
        made.append(name)
        return name

    yield make
    for name in made:
        with contextlib.suppress(ApiException):
            await ops.delete("Namespace", None, name)


async def real_session(kube, ops, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    """An AgentSession placed on the real node, once Running; with its pod."""
    await ops.create(session_manifest(name, namespace, **REAL_NODE_PLACEMENT, **spec))
    async with saying_state(kube, namespace):
        body = await session_in_phase(ops, namespace, name, "Running", timeout=START_SECONDS)
    return {"session": body, "pod": await ops.get("Pod", namespace, body["status"]["podName"])}


async def client_pod(kube, ops, namespace: str, name: str, labels: dict[str, str]) -> dict[str, Any]:
    """A pod of the sandbox image that only waits, to run probes in; on the real node, once Ready."""
    await ops.create({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            **REAL_NODE_PLACEMENT, "automountServiceAccountToken": False, "terminationGracePeriodSeconds": 0,
            "securityContext": {"seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{"name": "client", "image": DEFAULTS.sandbox_image,
                            "imagePullPolicy": DEFAULTS.image_pull_policy,
                            "command": ["python", "-c", "import time; time.sleep(10**9)"],
                            "securityContext": container_security_context(),
                            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}}]}})

    async def ready():
        pod = await ops.get("Pod", namespace, name)
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
        return pod if statuses and all(status["ready"] for status in statuses) else None

    async with saying_state(kube, namespace):
        return await eventually(ready, timeout=START_SECONDS, what=f"client pod {namespace}/{name} Ready")


async def run(*command: str) -> str:
    process = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, f"{' '.join(command)}: {stderr.decode()}"
    return stdout.decode()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def broken_images(real_node, tmp_path_factory) -> dict[str, str]:
    """Agent images that cannot run the runner: `python` is a static binary that refuses the runner's
    arguments and exits at once (crashing), or one only root may execute (not runnable as uid 65532)."""
    images, out = {}, tmp_path_factory.mktemp("images")
    for name, mode in (("crashing", "0755"), ("root-only", "0700")):
        image = f"localhost/agentbox-test/{name}:1"
        container = (await run("buildah", "from", "scratch")).strip()
        await run("buildah", "copy", "--chmod", mode, container, CATATONIT, "/usr/local/bin/python")
        await run("buildah", "commit", "--quiet", "--rm", container, image)
        archive = out / f"{name}.tar"
        await run("buildah", "push", "--quiet", image, f"docker-archive:{archive}:{image}")
        await run(str(REPO / "hack" / "real-node.sh"), "import", str(archive))
        images[name] = image
    return images


async def test_a_session_runs_as_real_containers(real_operator, kube, ops, tenants, api_namespace, real_node):
    tenant = await tenants()
    demo_tools = {"command": "python", "args": ["-m", "agentbox.sandbox.demo_tools"]}
    await ops.create(mcpserver_manifest("demo", tenant, transport="stdio", stdio=demo_tools))
    started = await real_session(kube, ops, tenant, "real", mcpServers=[{"name": "demo"}])
    session, pod = started["session"], started["pod"]
    assert pod["spec"]["nodeName"] == real_node
    # Admitted in a namespace that enforces PSS restricted, so the pod as rendered passes it.
    namespace = await ops.get("Namespace", None, tenant)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    gateway, egress = pod["status"]["initContainerStatuses"]
    (runner,) = pod["status"]["containerStatuses"]
    assert gateway["started"] and "running" in gateway["state"] and runner["ready"], pod["status"]
    assert egress["name"] == "egress" and egress["started"] and "running" in egress["state"], pod["status"]

    for container in ("runner", "gateway", "egress"):
        facts = await run_python(kube, pod, container, IDENTITY)
        assert facts == restricted_identity(SANDBOX_UID), container
    assert await run_python(kube, pod, "runner", WORKSPACE_WRITE) == {"owner": SANDBOX_UID, "content": "kept"}
    # The egress proxy in the pod refuses a host the session does not allow (its answer, not a timeout).
    refused = await run_python(kube, pod, "runner", FETCH, "https://not-allowed.example/", "proxy")
    assert "403" in refused.get("error", ""), refused

    # As the API does from outside the cluster: the pod's port through the Kubernetes API.
    secret = await ops.get("Secret", tenant, naming.child_name("real"))
    token = base64.b64decode(secret["data"][RUNNER_TOKEN_KEY]).decode()
    forwarder = PortForwarder(kube._configuration)
    try:
        url = forwarder.local_url(tenant, pod["metadata"]["name"], naming.ENDPOINT_PORT)
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     headers={"Authorization": f"Bearer {token}"}) as runner_api:
            assert (await runner_api.get("/readyz")).json() == {"agent": "ready"}
            assert (await runner_api.get("/status")).status_code == 200
            # The scripted agent calls the demo tool through the gateway container, which runs the stdio
            # server beside itself.
            content = 'tool demo_shout {"text": "from a real node"}'
            assert (await runner_api.post("/message", json={"content": content})).status_code == 200

            async def answered():
                messages = (await runner_api.get("/messages")).json()["messages"]
                asked = [i for i, m in enumerate(messages) if m["role"] == "user" and m["content"] == content]
                replies = [m for m in messages[asked[-1] + 1:] if m["role"] == "agent"] if asked else []
                return replies and (await runner_api.get("/status")).json()["status"] == "stable" and replies

            async with saying_state(kube, tenant):
                replies = await eventually(answered, timeout=120, what="the agent's answer")
            assert replies[-1]["content"] == "FROM A REAL NODE", replies
    finally:
        await forwarder.close()

    # As the API does inside the cluster: the session's endpoint, a Service name, from a pod labelled like it.
    api = await client_pod(kube, ops, api_namespace, "api-real", dict(DEFAULTS.api_pod_labels))
    assert session["status"]["endpoint"] == f"http://{naming.child_name('real')}.{tenant}.svc:3284"
    assert await run_python(kube, api, "client", FETCH, f"{session['status']['endpoint']}/readyz") == READY


async def test_network_policy_isolates_sessions_and_lets_dns_through(real_operator, kube, ops, tenants,
                                                                     api_namespace):
    tenant_a, tenant_b = await tenants(), await tenants()
    a1, a2, b1 = await asyncio.gather(real_session(kube, ops, tenant_a, "a1"),
                                      real_session(kube, ops, tenant_a, "a2"),
                                      real_session(kube, ops, tenant_b, "b1"))
    api, stranger = await asyncio.gather(
        client_pod(kube, ops, api_namespace, "api-np", dict(DEFAULTS.api_pod_labels)),
        client_pod(kube, ops, api_namespace, "stranger", {"app": "stranger"}))

    def url(target: dict[str, Any]) -> str:
        return f"http://{target['pod']['status']['podIP']}:{naming.ENDPOINT_PORT}/readyz"

    async def answers(source: dict[str, Any], container: str, target: dict[str, Any]) -> dict[str, Any]:
        return await run_python(kube, source, container, FETCH, url(target))

    # Reachable at all: the control plane's pods get each runner's answer.
    for target in (a1, a2, b1):
        async def allowed(target=target):
            return await answers(api, "client", target) == READY
        await eventually(allowed, timeout=POLICY_SECONDS,
                         what=f"the API pod reaching {target['pod']['metadata']['name']}")

    # Denied: another session of the same tenant, another tenant's session, a pod not labelled as the API.
    for source, container, target in ((a1["pod"], "runner", a2), (a1["pod"], "runner", b1),
                                      (b1["pod"], "runner", a1), (stranger, "client", a2)):
        answered: dict[str, Any] = {}

        async def refused(source=source, container=container, target=target, answered=answered):
            answered.clear()
            answered.update(await answers(source, container, target))
            return "error" in answered
        await eventually(refused, timeout=POLICY_SECONDS,
                         details=lambda answered=answered: f"it answered {answered}",
                         what=f"{source['metadata']['name']} refused by {target['pod']['metadata']['name']}")

    # Allowed egress: DNS through the cluster resolver, which answers for another session's Service name
    # (resolving is allowed, connecting is not: see above).
    b1_name = f"{naming.child_name('b1')}.{tenant_b}.svc.cluster.local"
    assert await run_python(kube, a1["pod"], "runner", RESOLVE, b1_name) == [b1["pod"]["status"]["podIP"]]
    assert await run_python(kube, a1["pod"], "runner", RESOLVE, "kube-dns.kube-system.svc.cluster.local") \
        == ["10.0.0.10"]


@pytest.mark.parametrize(("image", "reasons"), [
    ("localhost/agentbox-test/missing:1", {"ImagePullFailed"}),
    ("crashing", {"CrashLoopBackOff"}),
    ("root-only", {"CrashLoopBackOff", "ContainerConfigError"}),
])
async def test_an_agent_image_that_cannot_run_fails_the_session_with_a_reason(
        real_operator, kube, ops, tenants, broken_images, image, reasons):
    tenant = await tenants()
    name = "broken"
    agent = {"runtime": "scripted", "image": broken_images.get(image, image)}
    await ops.create(session_manifest(name, tenant, **REAL_NODE_PLACEMENT, agent=agent))
    # Never left Starting: Failed, with the reason on the Ready condition and the container named.
    async with saying_state(kube, tenant):
        body = await session_in_phase(ops, tenant, name, "Failed", timeout=START_SECONDS)
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] in reasons, ready
    assert "runner" in ready["message"], ready


async def test_a_real_agent_without_credentials_runs_until_it_refuses_and_the_session_needs_auth(
        real_operator, kube, ops, tenants):
    """Claude Code's ACP adapter from its image (make images), with no API key: it starts, opens its
    session, refuses the first prompt, and the session reads NeedsAuth, never Running with every turn
    failing."""
    tenant = await tenants()
    started = await real_session(kube, ops, tenant, "claude", agent={"runtime": "claude-code"})
    pod = started["pod"]
    (runner,) = pod["spec"]["containers"]
    assert runner["image"] == DEFAULTS.agent_images["claude-code"]
    secret = await ops.get("Secret", tenant, naming.child_name("claude"))
    token = base64.b64decode(secret["data"][RUNNER_TOKEN_KEY]).decode()
    forwarder = PortForwarder(kube._configuration)
    try:
        url = forwarder.local_url(tenant, pod["metadata"]["name"], naming.ENDPOINT_PORT)
        async with httpx.AsyncClient(base_url=url, timeout=90,
                                     headers={"Authorization": f"Bearer {token}"}) as runner_api:
            sent = await runner_api.post("/message", json={"content": "hello"})
            assert sent.status_code == 200, sent.text
    finally:
        await forwarder.close()
    async with saying_state(kube, tenant):
        body = await session_in_phase(ops, tenant, "claude", "NeedsAuth", timeout=START_SECONDS)
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "AgentNeedsAuth", ready
    assert "ANTHROPIC_API_KEY" in ready["message"], ready


@pytest.mark.parametrize(("runtime", "variable"), [("gemini", "GEMINI_API_KEY"), ("codex", "OPENAI_API_KEY")])
async def test_gemini_and_codex_from_their_images_need_auth_without_a_key(real_operator, kube, ops, tenants,
                                                                          runtime, variable):
    """Gemini CLI and codex-acp, each from its own image (make images), with no key: the agent starts,
    refuses to open a session without credentials, and the session reads NeedsAuth naming what to set."""
    tenant = await tenants()
    await ops.create(session_manifest(runtime, tenant, agent={"runtime": runtime}, **REAL_NODE_PLACEMENT))
    async with saying_state(kube, tenant):
        body = await session_in_phase(ops, tenant, runtime, "NeedsAuth", timeout=START_SECONDS)
    pod = await ops.get("Pod", tenant, naming.child_name(runtime))
    (runner,) = pod["spec"]["containers"]
    assert runner["image"] == DEFAULTS.agent_images[runtime]
    ready = next(c for c in body["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "AgentNeedsAuth", ready
    assert variable in ready["message"], ready


async def test_a_warm_pool_member_on_the_real_node_serves_the_session_that_claims_it(
        real_operator, kube, ops, tenants, real_node):
    """The member's containers start before any session exists; the claim re-issues the runner token and
    writes the session's system prompt, which the waiting runner reads once the kubelet has delivered
    them: the same pod (never restarted) then answers the session's messages, and the pool's token opens
    nothing."""
    tenant = await tenants()
    template = {"agent": {"runtime": "scripted"}, **REAL_NODE_PLACEMENT}
    await ops.create({"apiVersion": "agentbox.dev/v1alpha1", "kind": "AgentSessionPool",
                      "metadata": {"name": "warm", "namespace": tenant},
                      "spec": {"replicas": 1, "template": template}})

    async def member_running():
        pods = await ops.list("Pod", tenant, f"{naming.POOL_LABEL}=warm")
        return [pod for pod in pods if pod["status"].get("phase") == "Running"
                and all(status["started"] for status in pod["status"].get("initContainerStatuses") or [{}])]

    async with saying_state(kube, tenant):
        [member] = await eventually(member_running, timeout=START_SECONDS, what="a running pool member")
    pool_secret = await ops.get("Secret", tenant, member["metadata"]["name"])
    pool_token = base64.b64decode(pool_secret["data"][RUNNER_TOKEN_KEY]).decode()

    started = asyncio.get_running_loop().time()
    await ops.create(session_manifest("warm-real", tenant, **template, systemPrompt="you serve the claimant"))
    async with saying_state(kube, tenant):
        body = await session_in_phase(ops, tenant, "warm-real", "Running", timeout=START_SECONDS)
    claim_to_ready = asyncio.get_running_loop().time() - started
    assert body["status"]["poolMember"] == member["metadata"]["name"], body["status"]
    pod = await ops.get("Pod", tenant, member["metadata"]["name"])
    assert pod["metadata"]["uid"] == member["metadata"]["uid"] and pod["spec"]["nodeName"] == real_node
    (runner,) = pod["status"]["containerStatuses"]
    assert runner["restartCount"] == 0, runner

    secret = await ops.get("Secret", tenant, member["metadata"]["name"])
    token = base64.b64decode(secret["data"][RUNNER_TOKEN_KEY]).decode()
    forwarder = PortForwarder(kube._configuration)
    try:
        url = forwarder.local_url(tenant, pod["metadata"]["name"], naming.ENDPOINT_PORT)
        async with httpx.AsyncClient(base_url=url, timeout=30) as runner_api:
            stale = await runner_api.get("/status", headers={"Authorization": f"Bearer {pool_token}"})
            assert stale.status_code == 401
            runner_api.headers["Authorization"] = f"Bearer {token}"
            assert (await runner_api.post("/message", json={"content": "system-prompt"})).status_code == 200

            async def answered():
                messages = (await runner_api.get("/messages")).json()["messages"]
                replies = [m for m in messages if m["role"] == "agent"]
                return replies and (await runner_api.get("/status")).json()["status"] == "stable" and replies

            replies = await eventually(answered, timeout=120, what="the claimed agent's answer")
            assert replies[-1]["content"] == "you serve the claimant", replies
    finally:
        await forwarder.close()
    print(f"real node: claim -> Running {claim_to_ready:.1f} s")
