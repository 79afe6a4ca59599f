"""The port-forward transport against a kwok pod whose port 3284 kwok forwards to a local server
(a PortForward resource), through the real apiserver."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import pytest_asyncio
from fixtures.polling import eventually
from kubernetes_asyncio import client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agentbox.api.portforward import PortForwarder
from agentbox.api.problems import ProblemError
from agentbox.api.runner_client import RunnerClient

from .conftest import serve

RUNNER_PORT = 3284
BIG = b"x" * 1_000_000  # larger than any one websocket message or socket read


async def echo(request: Request) -> Response:
    return JSONResponse({"path": request.url.path, "body": len(await request.body())})


async def big(_: Request) -> Response:
    return Response(BIG, media_type="application/octet-stream")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def local_server():
    async with serve(Starlette(routes=[Route("/echo", echo, methods=["GET", "POST"]),
                                       Route("/big", big)])) as url:
        yield url


async def running_pod(kube, namespace: str, name: str) -> None:
    """A pod kwok runs; when it does not, the failure shows the pod, its events and kwok's last words."""
    seen: list[str] = []
    async with kube.api_client() as api:
        core = client.CoreV1Api(api)
        await core.create_namespaced_pod(namespace, {
            "metadata": {"name": name},
            "spec": {"restartPolicy": "Never",
                     "containers": [{"name": name, "image": "registry.invalid/none"}]}})

        async def running() -> bool:
            pod = await core.read_namespaced_pod(name, namespace)
            events = await core.list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
            seen[:] = [f"node={pod.spec.node_name} phase={pod.status.phase} conditions="
                       f"{[(c.type, c.status, c.reason) for c in pod.status.conditions or []]}",
                       *(f"event {e.reason}: {e.message}" for e in events.items)]
            return pod.status.phase == "Running"

        def details() -> str:
            logs = kube.kubeconfig.parent / "logs"
            tails = [f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                     for log in (logs / "kube-scheduler.log", logs / "kwok-controller.log") if log.exists()]
            return "\n".join([*seen, *tails])

        await eventually(running, timeout=60, what=f"pod {namespace}/{name} to be Running", details=details)


async def forward(kube, namespace: str, pod: str, target: str) -> None:
    target_port = {"address": "127.0.0.1", "port": int(target.rsplit(":", 1)[1])}
    async with kube.api_client() as api:
        await client.CustomObjectsApi(api).create_namespaced_custom_object(
            "kwok.x-k8s.io", "v1alpha1", namespace, "portforwards",
            {"apiVersion": "kwok.x-k8s.io/v1alpha1", "kind": "PortForward", "metadata": {"name": pod},
             "spec": {"forwards": [{"ports": [RUNNER_PORT], "target": target_port}]}})


async def until_answered(http: httpx.AsyncClient, url: str, seconds: float = 15) -> httpx.Response:
    """kwok picks a new PortForward up from its watch: the first connections may come too early."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await http.get(url)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest_asyncio.fixture(loop_scope="session")
async def forwarder(kube):
    forwarder = PortForwarder(kube._configuration, idle_seconds=60, connect_timeout=10)
    yield forwarder
    await forwarder.close()


async def test_a_pod_port_is_reached_through_the_kubernetes_api(kube, namespace, local_server, forwarder):
    await running_pod(kube, namespace, "runner")
    await forward(kube, namespace, "runner", local_server)
    url = forwarder.local_url(namespace, "runner", RUNNER_PORT)
    assert url.startswith("http://127.0.0.1:")
    assert forwarder.local_url(namespace, "runner", RUNNER_PORT) == url  # cached per pod and port
    async with httpx.AsyncClient(timeout=20) as http:
        first = await until_answered(http, f"{url}/echo")
        assert first.json() == {"path": "/echo", "body": 0}
        # Both directions carry more than one message's worth; concurrent connections each get a websocket.
        posted = await http.post(f"{url}/echo", content=BIG)
        assert posted.json() == {"path": "/echo", "body": len(BIG)}
        answers = await asyncio.gather(*(http.get(f"{url}/big") for _ in range(5)))
        assert all(answer.content == BIG for answer in answers)

    await forwarder.close()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as http:
            await http.get(f"{url}/echo")


async def test_an_idle_listener_is_closed_and_made_again_when_needed(kube, namespace, local_server):
    await running_pod(kube, namespace, "idle")
    await forward(kube, namespace, "idle", local_server)
    forwarder = PortForwarder(kube._configuration, idle_seconds=0.5)
    try:
        url = forwarder.local_url(namespace, "idle", RUNNER_PORT)
        async with httpx.AsyncClient(timeout=20) as http:
            assert (await until_answered(http, f"{url}/echo")).status_code == 200
        await asyncio.sleep(1.5)
        with pytest.raises(httpx.ConnectError):
            async with httpx.AsyncClient(timeout=5) as http:
                await http.get(f"{url}/echo")
        again = forwarder.local_url(namespace, "idle", RUNNER_PORT)
        async with httpx.AsyncClient(timeout=20) as http:
            assert (await until_answered(http, f"{again}/echo")).status_code == 200
    finally:
        await forwarder.close()


def session(namespace: str, pod: str | None) -> dict:
    return {"metadata": {"name": "s", "namespace": namespace},
            "status": {"endpoint": f"http://s.{namespace}.svc:{RUNNER_PORT}", "podName": pod}}


async def test_an_unreachable_pod_is_a_503_to_retry(kube, namespace, forwarder):
    await running_pod(kube, namespace, "unforwarded")  # kwok has no forward for it: the error channel says so
    async with httpx.AsyncClient(timeout=10) as http:
        runner = RunnerClient(http, forwarder=forwarder)
        assert runner.base_url(session(namespace, None)) is None  # no pod yet: not ready
        for pod in ("unforwarded", "no-such-pod"):
            base_url = runner.base_url(session(namespace, pod))
            with pytest.raises(ProblemError) as refused:
                await runner.call(base_url, "token", "GET", "/status")
            assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "2"}
            assert "not reachable" in refused.value.detail
            with pytest.raises(ProblemError):
                await runner.events(base_url, "token")
