"""Control-plane API latency at a fixed rate, each figure beside unauthenticated /livez from the same run.

One uvicorn worker (`python -m agentbox.api`) on 127.0.0.1, a throwaway PostgreSQL 15 (hack/postgres.sh,
fsync off), RS256 tokens checked against a JWKS document this process serves on 127.0.0.1, and the local
cluster $AGENTBOX_CLUSTER_NAME (default agentbox; hack/cluster.sh up) for sessions. Each phase sends
requests on a fixed schedule (open loop: a slow answer does not delay the next request), alternating the
measured route with /livez, so both see the same load. Then chained audit inserts per second through
bench/bench_audit.py.

    python -m bench.bench_api [--rate 50] [--seconds 10]      # one JSON document on stdout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from agentbox.api.crypto import generate_key_entry
from agentbox.api.db import Database
from agentbox.api.migrate import migrate, provision
from bench import CLUSTER_NAME
from bench.bench_audit import TARGET_ROWS_PER_SECOND, insert_rows
from bench.bench_gateway import summary
from bench.postgres import throwaway_postgres

REPO = Path(__file__).resolve().parents[1]
ISSUER = "https://auth.bench.test/auth/v1"
KID = "bench-rsa"
TARGET_P99_RATIO = 3.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Tokens:
    """An RSA key published as a JWKS document; tokens signed with it."""

    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": KID, "use": "sig", "alg": "RS256"}]}

    def token(self, sub: str, *, org: str | None = None, role: str = "user", platform: bool = False) -> str:
        now = int(time.time())
        claims = {"iss": ISSUER, "aud": "authenticated", "sub": sub, "iat": now, "exp": now + 3600,
                  "role": "service_role" if platform else "authenticated"}
        if org is not None:
            claims["app_metadata"] = {"org_id": org, "role": role}
        return jwt.encode(claims, self.key, algorithm="RS256", headers={"kid": KID})


@contextlib.asynccontextmanager
async def jwks_server(tokens: Tokens) -> AsyncIterator[str]:
    async def document(_: Any) -> JSONResponse:
        return JSONResponse(tokens.jwks())

    app = Starlette(routes=[Route("/jwks.json", document)])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="off"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/jwks.json"
    finally:
        server.should_exit = True
        await task


def cluster_kubeconfig() -> tuple[str | None, str | None]:
    """(kubeconfig, None) when the local cluster is up or could be started; (None, why) otherwise."""
    try:
        started = subprocess.run([str(REPO / "hack" / "cluster.sh"), "up"], capture_output=True, text=True,
                                 timeout=600, env={**os.environ, "AGENTBOX_CLUSTER_NAME": CLUSTER_NAME})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"hack/cluster.sh up: {exc}"
    if started.returncode != 0:
        lines = started.stderr.strip().splitlines() or ["failed without a message"]
        return None, f"hack/cluster.sh up: {lines[-1]}"
    return started.stdout.strip().splitlines()[-1], None


@contextlib.asynccontextmanager
async def api_process(env: dict[str, str], port: int) -> AsyncIterator[str]:
    """`python -m agentbox.api`: one process, one worker, until the block ends."""
    env = {**os.environ, **env, "AGENTBOX_HOST": "127.0.0.1", "AGENTBOX_PORT": str(port),
           "AGENTBOX_LOG_LEVEL": "WARNING"}
    process = await asyncio.create_subprocess_exec(sys.executable, "-m", "agentbox.api", env=env,
                                                   stdout=asyncio.subprocess.DEVNULL,
                                                   stderr=asyncio.subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=1) as http:
            for _ in range(300):
                if process.returncode is not None:
                    raise RuntimeError(f"the API exited: {(await process.stderr.read()).decode()[-2000:]}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/livez")).status_code == 200:
                        break
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the API did not answer /livez within 30 s")
        yield base
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


async def fixed_rate(http: httpx.AsyncClient, measured: Callable[[httpx.AsyncClient, int], Any], rate: float,
                     seconds: float, expect: int) -> dict[str, Any]:
    """Send `measured` and GET /livez alternately at `rate` requests per second in all, for `seconds`."""
    latencies: dict[str, list[float]] = {"measured": [], "livez": []}
    errors: dict[str, int] = {}

    async def one(index: int) -> None:
        which = "measured" if index % 2 == 0 else "livez"
        started = time.perf_counter()
        try:
            response = await (measured(http, index) if which == "measured" else http.get("/livez"))
            status = response.status_code
        except httpx.HTTPError as exc:
            status = type(exc).__name__
        elapsed = time.perf_counter() - started
        if status == (expect if which == "measured" else 200):
            latencies[which].append(elapsed)
        else:
            errors[f"{which}:{status}"] = errors.get(f"{which}:{status}", 0) + 1

    total = int(rate * seconds)
    begin = time.perf_counter()
    tasks = []
    for index in range(total):
        delay = begin + index / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(index)))
    await asyncio.gather(*tasks)
    measured_summary, livez_summary = summary(latencies["measured"]), summary(latencies["livez"])
    return {"requests_per_second": rate, "seconds": seconds, "samples": len(latencies["measured"]),
            "latency": measured_summary, "livez": livez_summary,
            "p50_ratio_to_livez": round(measured_summary["p50_ms"] / livez_summary["p50_ms"], 2),
            "p99_ratio_to_livez": round(measured_summary["p99_ms"] / livez_summary["p99_ms"], 2),
            "errors": errors}


async def run(rate: float, seconds: float, dsn: str) -> dict[str, Any]:
    org = f"bench{secrets.token_hex(3)}"
    created = await provision(dsn, f"bench_api_{secrets.token_hex(3)}", secrets.token_urlsafe(16),
                              secrets.token_urlsafe(16))
    await migrate(created.owner_dsn)
    tokens = Tokens()
    kubeconfig, cluster_problem = cluster_kubeconfig()
    result: dict[str, Any] = {
        "benchmark": "api",
        "what": "latency at a fixed rate, one uvicorn worker, RS256 via JWKS, measured route alternating "
                "with unauthenticated /livez in the same run",
        "server": {"workers": 1, "host": "127.0.0.1", "postgres": "15 (fsync off)",
                   "cluster": CLUSTER_NAME if kubeconfig else None},
    }
    env = {"AGENTBOX_DATABASE_URL": created.app_dsn, "AGENTBOX_JWT_ISSUER": ISSUER,
           "AGENTBOX_ENCRYPTION_KEYS": generate_key_entry("bench")}
    if kubeconfig:
        env["KUBECONFIG"] = kubeconfig
    admin = {"Authorization": f"Bearer {tokens.token('bench-admin', org=org, role='admin')}"}
    platform = {"Authorization": f"Bearer {tokens.token('bench-operator', platform=True)}"}
    async with jwks_server(tokens) as jwks_url, \
            api_process({**env, "AGENTBOX_JWT_JWKS_URL": jwks_url}, free_port()) as base, \
            httpx.AsyncClient(base_url=base, timeout=10,
                              limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)) as http:
        if kubeconfig:
            made = await http.post("/api/v1/orgs", headers=platform, json={"id": org, "name": org})
            assert made.status_code == 201, made.text
        else:
            async with Database(created.owner_dsn) as owner, owner.platform() as conn:
                await conn.execute("INSERT INTO organizations (id, name) VALUES ($1, $1)", org)
        for index in range(20):  # warm-up: connections, JWKS, pool; a few sessions to list
            if kubeconfig and index < 5:
                await http.post("/api/v1/sessions", headers=admin,
                                json={"name": f"warm-{index}", "agent": {"runtime": "scripted"}})
            await http.get("/api/v1/mcp/configurations", headers=admin)
            await http.get("/livez")

        result["get_mcp_configurations"] = await fixed_rate(
            http, lambda h, _: h.get("/api/v1/mcp/configurations", headers=admin), rate, seconds, 200)
        if kubeconfig:
            result["get_sessions"] = await fixed_rate(
                http, lambda h, _: h.get("/api/v1/sessions", headers=admin), rate, seconds, 200)
            result["post_sessions"] = await fixed_rate(
                http, lambda h, i: h.post("/api/v1/sessions", headers=admin,
                                          json={"name": f"s-{i}", "agent": {"runtime": "scripted"}}),
                rate / 4, seconds, 201)
        else:
            result["sessions"] = f"not measured: no cluster ({cluster_problem})"
    if kubeconfig:  # the sessions go with their namespace
        await _delete_namespace(kubeconfig, f"tenant-{org}")

    async with Database(created.app_dsn, max_size=8) as db:
        async with db.platform() as conn:
            await conn.execute("INSERT INTO organizations (id, name) VALUES ('audit-bench', 'audit-bench')")
        await insert_rows(db, ["audit-bench"], 200, 8)
        audit_rate = await insert_rows(db, ["audit-bench"], 5000, 8)
    result["audit_chained_rows_per_second"] = round(audit_rate)
    get_ratio = result.get("get_sessions", result["get_mcp_configurations"])["p99_ratio_to_livez"]
    result["targets"] = {
        "authenticated_get_p99_at_most_livez_times": TARGET_P99_RATIO,
        "met_get_sessions": get_ratio <= TARGET_P99_RATIO if "get_sessions" in result else None,
        "met_get_mcp_configurations":
            result["get_mcp_configurations"]["p99_ratio_to_livez"] <= TARGET_P99_RATIO,
        "audit_rows_per_second_at_least": TARGET_ROWS_PER_SECOND,
        "met_audit": audit_rate >= TARGET_ROWS_PER_SECOND,
    }
    return result


async def _delete_namespace(kubeconfig: str, namespace: str) -> None:
    from kubernetes_asyncio import client, config

    configuration = client.Configuration()
    await config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    async with client.ApiClient(configuration=configuration) as api:
        with contextlib.suppress(client.exceptions.ApiException):
            await client.CoreV1Api(api).delete_namespace(namespace)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=50, help="requests per second in all (half /livez)")
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    with throwaway_postgres() as dsn:
        result = asyncio.run(run(args.rate, args.seconds, dsn))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
