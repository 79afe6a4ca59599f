"""Run the operator and the API as local processes with exactly the Helm chart's permissions.

    python hack/chart_identity.py --kubeconfig ADMIN --namespace agentbox-system --release agentbox \
        --out .dev/identity

renders the chart's ServiceAccounts and RBAC (`helm template --show-only`), applies them, asks the
apiserver for a token of each ServiceAccount (TokenRequest, through `kubectl create token`) and writes
OUT/operator.kubeconfig and OUT/api.kubeconfig: the admin kubeconfig's cluster with the token as user,
and OUT/operator.env: the operator container's environment from the chart's Deployment, one NAME=VALUE a
line. Used by hack/dev.sh and by the chart, operator and e2e tests, so dev, tests and a real install share
one RBAC and one operator configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "agentbox"
RBAC_TEMPLATES = ("templates/operator-rbac.yaml", "templates/api-rbac.yaml")
OPERATOR_TEMPLATE = "templates/operator-deployment.yaml"
# Values the chart requires before it renders at all; RBAC does not depend on them.
PLACEHOLDER_VALUES = ("jwt.issuer=https://issuer.invalid", "jwt.jwksUrl=https://issuer.invalid/jwks",
                      "database.url=postgresql://unused@localhost/unused")
# A local API is outside the cluster: it reaches session runners by port-forward, with the RBAC for it.
LOCAL_PROCESS_VALUES = ("api.runnerTransport=port-forward",)


class ToolError(RuntimeError):
    """helm or kubectl exited non-zero; the message carries its stderr."""


@dataclass(frozen=True)
class Tools:
    kubectl: Path
    helm: Path
    kubeconfig: Path

    async def run(self, *argv: str | Path, input: str | None = None) -> str:
        process = await asyncio.create_subprocess_exec(
            *map(str, argv), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL)
        stdout, stderr = await process.communicate(input.encode() if input is not None else None)
        if process.returncode != 0:
            raise ToolError(f"{Path(str(argv[0])).name} {' '.join(map(str, argv[1:4]))}...: "
                            f"{stderr.decode().strip()}")
        return stdout.decode()

    async def kubectl_(self, *argv: str, input: str | None = None) -> str:
        return await self.run(self.kubectl, "--kubeconfig", self.kubeconfig, *argv, input=input)


def service_account_names(release: str) -> dict[str, str]:
    """The chart's ServiceAccount names for a release (mirrors agentbox.fullname in _helpers.tpl)."""
    full = release if "agentbox" in release else f"{release}-agentbox"
    full = full[:63].rstrip("-")
    return {"operator": f"{full}-operator", "api": f"{full}-api"}


async def render_rbac(tools: Tools, release: str, namespace: str) -> str:
    argv: list[str | Path] = [tools.helm, "template", release, CHART, "--namespace", namespace]
    for template in RBAC_TEMPLATES:
        argv += ["--show-only", template]
    for value in PLACEHOLDER_VALUES + LOCAL_PROCESS_VALUES:
        argv += ["--set", value]
    return await tools.run(*argv)


@dataclass(frozen=True)
class OperatorCommand:
    """What the chart's operator container runs with: its arguments and environment."""

    args: list[str]
    env: dict[str, str]


def operator_command(deployment: dict, namespace: str) -> OperatorCommand:
    """The operator container of a rendered Deployment; the pod's namespace (a fieldRef) is filled in as
    the kubelet would, and any other reference is refused rather than left out."""
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {}
    for entry in container.get("env") or []:
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        elif (entry.get("valueFrom") or {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            env[entry["name"]] = namespace
        else:
            raise ValueError(f"operator env {entry['name']}: only values and the pod's namespace resolve")
    return OperatorCommand(args=list(container.get("args") or []), env=env)


async def render_operator(tools: Tools, release: str, namespace: str,
                          values: tuple[str, ...] = ()) -> OperatorCommand:
    """The chart's operator command for a release (`values`: extra `--set` entries)."""
    argv: list[str | Path] = [tools.helm, "template", release, CHART, "--namespace", namespace,
                              "--show-only", OPERATOR_TEMPLATE]
    for value in PLACEHOLDER_VALUES + values:
        argv += ["--set", value]
    return operator_command(yaml.safe_load(await tools.run(*argv)), namespace)


async def ensure_namespace(tools: Tools, namespace: str) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    await tools.kubectl_("apply", "--server-side", "--field-manager=agentbox-dev", "-f", "-", input=manifest)


def token_kubeconfig(admin: dict, token: str, user: str) -> dict:
    """The admin kubeconfig's current cluster (server, CA inlined) with a bearer token as the only user."""
    context_name = admin["current-context"]
    context = next(c["context"] for c in admin["contexts"] if c["name"] == context_name)
    cluster = next(c["cluster"] for c in admin["clusters"] if c["name"] == context["cluster"])
    return {"apiVersion": "v1", "kind": "Config", "current-context": user,
            "clusters": [{"name": context["cluster"], "cluster": cluster}],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [{"name": user, "context": {"cluster": context["cluster"], "user": user}}]}


async def write_operator_env(tools: Tools, release: str, namespace: str, out: Path) -> Path:
    """OUT/operator.env: the chart operator's environment, one NAME=VALUE a line (no secrets in it)."""
    operator = await render_operator(tools, release, namespace)
    path = out / "operator.env"
    lines = "".join(f"{name}={value}\n" for name, value in operator.env.items())
    await asyncio.to_thread(path.write_text, lines)
    return path


async def write_identities(tools: Tools, release: str, namespace: str, out: Path,
                           duration: str = "24h") -> dict[str, Path]:
    """Apply the chart's RBAC; write one token kubeconfig per ServiceAccount; return their paths."""
    await ensure_namespace(tools, namespace)
    rbac = await render_rbac(tools, release, namespace)
    await tools.kubectl_("apply", "--server-side", "--force-conflicts", "--field-manager=agentbox-dev",
                         "--namespace", namespace, "-f", "-", input=rbac)
    admin = json.loads(await tools.kubectl_("config", "view", "--raw", "--minify", "--flatten", "-o", "json"))
    paths = {}
    for role, account in service_account_names(release).items():
        token = (await tools.kubectl_("create", "token", account, "--namespace", namespace,
                                      "--duration", duration)).strip()
        paths[role] = out / f"{role}.kubeconfig"
        await asyncio.to_thread(write_private, paths[role],
                                yaml.safe_dump(token_kubeconfig(admin, token, f"{namespace}:{account}")))
    return paths


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds a bearer token)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    os.chmod(path, 0o600)
    path.write_text(text)


async def write_all(tools: Tools, release: str, namespace: str, out: Path, duration: str) -> dict[str, Path]:
    paths = await write_identities(tools, release, namespace, out, duration)
    paths["operator-env"] = await write_operator_env(tools, release, namespace, out)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/chart_identity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--kubeconfig", type=Path, required=True, help="an admin kubeconfig")
    parser.add_argument("--kubectl", type=Path, required=True)
    parser.add_argument("--helm", type=Path, required=True)
    parser.add_argument("--namespace", default="agentbox-system")
    parser.add_argument("--release", default="agentbox")
    parser.add_argument("--out", type=Path, required=True, help="folder of the files written")
    parser.add_argument("--duration", default="24h", help="token lifetime (the apiserver may cap it)")
    args = parser.parse_args(argv)
    tools = Tools(kubectl=args.kubectl, helm=args.helm, kubeconfig=args.kubeconfig)
    try:
        paths = asyncio.run(write_all(tools, args.release, args.namespace, args.out, args.duration))
    except ToolError as error:
        print(f"chart_identity: {error}", file=sys.stderr)
        return 1
    for role, path in paths.items():
        print(f"{role}={path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
