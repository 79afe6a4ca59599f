"""The sandbox pod: the agent runner plus the MCP gateway and the egress proxy as native sidecars, PSS
"restricted". Each credential is mounted into the one container that uses it: MCP credentials into the
gateway, the provider key into the egress proxy, the runner token into the runner."""

import hashlib
import json
from collections.abc import Iterable
from typing import Any

from agentbox.operator import naming
from agentbox.operator.build.common import Session
from agentbox.operator.build.configmap import (
    CONFIG_DIR,
    EGRESS_CONFIG_KEY,
    GATEWAY_CONFIG_KEY,
    SYSTEM_PROMPT_KEY,
)
from agentbox.operator.build.egress import (
    EGRESS_HOST,
    EGRESS_PORT,
    EGRESS_SECRETS_DIR,
    PROVIDER_KEY,
    runner_variables,
)
from agentbox.operator.build.mcp import GATEWAY_HOST, GATEWAY_PORT, SECRETS_DIR
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY

SANDBOX_UID = 65532
WORKSPACE_DIR = "/workspace"
RUNNER_CONTAINER = "runner"
EGRESS_CONTAINER = "egress"
# Where the runner says why it gave up on its agent when it exits (read back by status.container_failure).
TERMINATION_MESSAGE_PATH = "/dev/termination-log"
# An auth refusal the runner remembers across its container's restarts: on the pod's /tmp emptyDir.
NEEDS_AUTH_FILE = "/tmp/agentbox-runner-needs-auth"  # noqa: S108 (an emptyDir, not the host's /tmp)


def _digest(material: Any) -> str:
    """sha256 (hex) of a JSON value, its keys sorted: equal values, equal digests."""
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def config_hash(configmap: dict[str, Any], secret: dict[str, Any]) -> str:
    """sha256 of everything the pod reads from its ConfigMap and Secret: a change rolls the pod."""
    return _digest([configmap.get("data", {}), secret.get("data", {})])


def spec_hash(pod_spec: dict[str, Any]) -> str:
    """sha256 of the pod's spec as rendered: a change (the session's image, resources, placement...) rolls
    the pod, which Kubernetes would not let us edit in place."""
    return _digest(pod_spec)


# The fields through which a pod names its own children, blanked by template_hash.
_CHILD_REFERENCES = (("persistentVolumeClaim", "claimName"), ("configMap", "name"), ("secret", "secretName"))


def template_hash(pod: dict[str, Any], configmap: dict[str, Any], secret: dict[str, Any]) -> str:
    """A hash of the pod's spec without the names of its own claim, ConfigMap and Secret, and of what its
    sidecars read from them at start (all but the system prompt and the runner token, which the runner
    reads once claimed). Two sandboxes that hash alike differ only in whose they are, so a session may
    take over a pool member whose hash is that of the sandbox it would have started. A label value."""
    spec = json.loads(json.dumps(pod["spec"]))
    for volume in spec.get("volumes") or []:
        for source, field in _CHILD_REFERENCES:
            if source in volume:
                volume[source][field] = ""
    config = {key: value for key, value in (configmap.get("data") or {}).items() if key != SYSTEM_PROMPT_KEY}
    secrets = {key: value for key, value in (secret.get("data") or {}).items() if key != RUNNER_TOKEN_KEY}
    return _digest([spec, config, secrets])[:32]


def member_hash(template: str, workspace: dict[str, Any]) -> str:
    """What a session and a pool member must share for the session to claim it: the sandbox (`template`, its
    template_hash) and the storage class and requested size of its workspace claim (`workspace`), which
    the claim's handover cannot change (a claim's class is immutable, its size never shrinks). A label
    value."""
    spec = workspace["spec"]
    return _digest([template, spec.get("storageClassName"), spec["resources"]["requests"]["storage"]])[:32]


def container_security_context() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}, "privileged": False,
            "readOnlyRootFilesystem": True, "runAsNonRoot": True, "runAsUser": SANDBOX_UID,
            "runAsGroup": SANDBOX_UID, "seccompProfile": {"type": "RuntimeDefault"}}


def _mounts(secrets_volume: str | None, workspace: bool,
            secrets_dir: str = SECRETS_DIR) -> list[dict[str, Any]]:
    mounts = [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
              {"name": "tmp", "mountPath": "/tmp"}]  # noqa: S108 (an emptyDir, not the host's /tmp)
    if secrets_volume:
        mounts.append({"name": secrets_volume, "mountPath": secrets_dir, "readOnly": True})
    if workspace:
        mounts.append({"name": "workspace", "mountPath": WORKSPACE_DIR})
    return mounts


def _secret_volume(name: str, secret_name: str, keys: list[str]) -> dict[str, Any]:
    """One Secret, only the listed keys: the runner never sees MCP credentials, the gateway never the
    runner token (the agent runs in the runner container)."""
    return {"name": name, "secret": {"secretName": secret_name, "defaultMode": 0o440,
                                     "items": [{"key": key, "path": key} for key in keys]}}


def runner_env(session: Session, *, provider_key: bool = False) -> list[dict[str, Any]]:
    agent = session.spec.agent
    env = [{"name": "AGENTBOX_RUNTIME", "value": agent.runtime},
           {"name": "AGENTBOX_RUNNER_TOKEN_FILE", "value": f"{SECRETS_DIR}/{RUNNER_TOKEN_KEY}"},
           {"name": "AGENTBOX_SYSTEM_PROMPT_FILE", "value": f"{CONFIG_DIR}/{SYSTEM_PROMPT_KEY}"},
           {"name": "AGENTBOX_GATEWAY_URL", "value": f"http://{GATEWAY_HOST}:{GATEWAY_PORT}/mcp"},
           {"name": "AGENTBOX_WORKSPACE", "value": WORKSPACE_DIR},
           {"name": "AGENTBOX_TERMINATION_MESSAGE_FILE", "value": TERMINATION_MESSAGE_PATH},
           {"name": "AGENTBOX_NEEDS_AUTH_FILE", "value": NEEDS_AUTH_FILE},
           {"name": "HOME", "value": "/tmp"}]  # noqa: S108 (an emptyDir)
    if agent.model:
        env.append({"name": "AGENTBOX_AGENT_MODEL", "value": agent.model})
    if agent.command:
        env.append({"name": "AGENTBOX_AGENT_COMMAND", "value": json.dumps([*agent.command, *agent.args])})
    elif agent.args:
        env.append({"name": "AGENTBOX_AGENT_ARGS", "value": json.dumps(agent.args)})
    env.extend(runner_variables(session, has_key=provider_key))
    # User variables come last but can never shadow ours: AGENTBOX_* names, provider credentials, base URLs
    # and proxy variables are rejected at admission.
    env.extend(var.model_dump(by_alias=True, exclude_none=True) for var in agent.env)
    return env


def _started_check(host: str, port: int) -> list[str]:
    # Loopback only, hence exec: a kubelet HTTP probe would knock on the pod's address.
    return ["python", "-c", f"import urllib.request; urllib.request.urlopen('http://{host}:{port}/healthz', "
                            "timeout=2)"]


def build_pod(session: Session, *, image: str, pull_policy: str, config_digest: str,
              runner_resources: dict[str, Any], gateway_resources: dict[str, Any],
              egress_resources: dict[str, Any] | None = None,
              credential_keys: Iterable[str] = (), provider_key: bool = False,
              runner_image: str | None = None,
              node_selector: dict[str, str] | None = None, tolerations: Iterable[dict[str, Any]] = ()
              ) -> dict[str, Any]:
    """`image`: the sandbox image (the gateway; the runner too unless `runner_image`, the runtime's agent
    image, or the session's own spec.agent.image says otherwise). `credential_keys`: the session Secret's
    MCP credential keys, mounted into the gateway alone. `provider_key`: the session Secret holds the
    provider's key (PROVIDER_KEY), mounted into the egress proxy alone. `node_selector`, `tolerations`: the
    operator's placement for every session; the session's own spec adds to them (its selector wins on the
    same label)."""
    spec = session.spec
    mcp_keys = sorted(credential_keys)
    gateway = {
        "name": "gateway", "image": image, "imagePullPolicy": pull_policy,
        "command": ["python", "-m", "agentbox.sandbox.gateway"],
        "env": [{"name": "AGENTBOX_GATEWAY_CONFIG", "value": f"{CONFIG_DIR}/{GATEWAY_CONFIG_KEY}"},
                {"name": "HOME", "value": "/tmp"}],  # noqa: S108 (an emptyDir)
        "restartPolicy": "Always",  # a native sidecar: starts first, lives as long as the runner
        # The runner starts once this passes, so the agent's first tool call finds the gateway listening.
        "startupProbe": {"exec": {"command": _started_check(GATEWAY_HOST, GATEWAY_PORT)},
                         "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 120},
        "resources": gateway_resources, "securityContext": container_security_context(),
        # An empty items list would project every key, so no credentials means no secret volume at all.
        "volumeMounts": _mounts("mcp-secrets" if mcp_keys else None, workspace=False)}
    egress = {
        "name": EGRESS_CONTAINER, "image": image, "imagePullPolicy": pull_policy,
        "command": ["python", "-m", "agentbox.sandbox.egress"],
        "env": [{"name": "AGENTBOX_EGRESS_CONFIG", "value": f"{CONFIG_DIR}/{EGRESS_CONFIG_KEY}"},
                {"name": "HOME", "value": "/tmp"}],  # noqa: S108 (an emptyDir)
        "restartPolicy": "Always",
        # The agent's first model call and download find the proxy listening.
        "startupProbe": {"exec": {"command": _started_check(EGRESS_HOST, EGRESS_PORT)},
                         "periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 120},
        "resources": egress_resources or gateway_resources, "securityContext": container_security_context(),
        "volumeMounts": _mounts("egress-secrets" if provider_key else None, workspace=False,
                                secrets_dir=EGRESS_SECRETS_DIR)}
    runner = {
        "name": RUNNER_CONTAINER, "image": spec.agent.image or runner_image or image,
        "imagePullPolicy": pull_policy,
        "command": ["python", "-m", "agentbox.sandbox.runner"],
        "ports": [{"name": "http", "containerPort": naming.ENDPOINT_PORT, "protocol": "TCP"}],
        "env": runner_env(session, provider_key=provider_key), "workingDir": WORKSPACE_DIR,
        # Ready only while the agent can take a message (not starting, not refusing to authenticate). Asked
        # every second: a new session waits for this (a local HTTP GET, cheap for the kubelet).
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 1},
        # The runner's own message when it gives up (it exits 69 or 77); the tail of its log when it dies
        # some other way.
        "terminationMessagePath": TERMINATION_MESSAGE_PATH,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": spec.resources or runner_resources, "securityContext": container_security_context(),
        "volumeMounts": _mounts("runner-secrets", workspace=True)}
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "restartPolicy": "Always",
        "terminationGracePeriodSeconds": 15,
        "securityContext": {"runAsNonRoot": True, "runAsUser": SANDBOX_UID, "runAsGroup": SANDBOX_UID,
                            "fsGroup": SANDBOX_UID, "seccompProfile": {"type": "RuntimeDefault"}},
        "initContainers": [gateway, egress],
        "containers": [runner],
        "volumes": [
            {"name": "workspace", "persistentVolumeClaim": {"claimName": session.child_name}},
            {"name": "config", "configMap": {"name": session.child_name}},
            _secret_volume("runner-secrets", session.child_name, [RUNNER_TOKEN_KEY]),
            {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}},
        ],
    }
    if mcp_keys:
        pod_spec["volumes"].append(_secret_volume("mcp-secrets", session.child_name, mcp_keys))
    if provider_key:
        pod_spec["volumes"].append(_secret_volume("egress-secrets", session.child_name, [PROVIDER_KEY]))
    if spec.runtime_class_name:
        pod_spec["runtimeClassName"] = spec.runtime_class_name
    selector = {**(node_selector or {}), **spec.node_selector}
    if selector:
        pod_spec["nodeSelector"] = selector
    placed = list(tolerations)
    all_tolerations = [*placed, *(toleration for toleration in spec.tolerations if toleration not in placed)]
    if all_tolerations:
        pod_spec["tolerations"] = all_tolerations
    return {"apiVersion": "v1", "kind": "Pod", "spec": pod_spec,
            "metadata": session.metadata({naming.CONFIG_HASH_ANNOTATION: config_digest,
                                          naming.SPEC_HASH_ANNOTATION: spec_hash(pod_spec)})}
