"""Pure builders: every child of a session from (spec, references), no cluster involved."""

import json

import pytest

from agentbox.crds.agentsession import AgentSessionSpec, MCPServerRef
from agentbox.crds.conditions import Reason
from agentbox.operator import naming
from agentbox.operator.build import mcp, tenant
from agentbox.operator.build.common import Session
from agentbox.operator.build.configmap import build_configmap
from agentbox.operator.build.networkpolicy import build_session_policy
from agentbox.operator.build.pod import build_pod, config_hash, spec_hash
from agentbox.operator.build.pvc import build_pvc
from agentbox.operator.build.secret import build_secret
from agentbox.operator.build.service import build_service

b64 = mcp.encode


def make_session(**spec) -> Session:
    return Session(
        "demo",
        "tenant-acme",
        "uid-1",
        AgentSessionSpec.model_validate({"tenant": {"org": "acme", "user": "ada@example.com"}, **spec}),
    )


def make_pod(session: Session, digest: str = "abc") -> dict:
    return build_pod(
        session,
        image="img:1",
        pull_policy="IfNotPresent",
        config_digest=digest,
        runner_resources={"limits": {"cpu": "1"}},
        gateway_resources={"limits": {"cpu": "100m"}},
    )


def test_every_child_is_owned_labelled_and_named_alike():
    session = make_session()
    children = [
        build_configmap(session, {}, {}),
        build_secret(session, b64("t"), {}),
        build_pvc(session),
        build_service(session),
        build_session_policy(session, "agentbox-system", {"a": "b"}, [443]),
        make_pod(session),
    ]
    for child in children:
        meta = child["metadata"]
        assert meta["name"] == naming.child_name("demo") and meta["namespace"] == "tenant-acme"
        assert meta["labels"] == {
            "app.kubernetes.io/managed-by": "agentbox",
            "agentbox.dev/session": "demo",
            "agentbox.dev/org": "acme",
        }
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "agentbox.dev/v1alpha1",
                "kind": "AgentSession",
                "name": "demo",
                "uid": "uid-1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]


def test_pod_is_hardened():
    pod = make_pod(make_session())
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    for container in [*spec["initContainers"], *spec["containers"]]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False and context["capabilities"] == {"drop": ["ALL"]}
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 65532
        assert context["readOnlyRootFilesystem"] is True
    assert {volume["name"] for volume in spec["volumes"]} == {"workspace", "config", "runner-secrets", "tmp"}
    assert all(
        set(volume) & {"persistentVolumeClaim", "configMap", "secret", "emptyDir"}
        for volume in spec["volumes"]
    )


def test_pod_layout_matches_the_sandbox_interface():
    pod = make_pod(
        make_session(agent={"runtime": "scripted", "model": "m1", "env": [{"name": "X", "value": "1"}]})
    )
    gateway, egress = pod["spec"]["initContainers"]
    (runner,) = pod["spec"]["containers"]
    assert gateway["restartPolicy"] == egress["restartPolicy"] == "Always"  # native sidecars
    assert gateway["command"] == ["python", "-m", "agentbox.sandbox.gateway"]
    assert runner["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    probe = gateway["startupProbe"]["exec"]["command"]
    assert probe[:2] == ["python", "-c"] and "http://127.0.0.1:8765/healthz" in probe[2]
    assert {"name": "AGENTBOX_GATEWAY_CONFIG", "value": "/etc/agentbox/gateway.json"} in gateway["env"]
    assert "http://127.0.0.1:8766/healthz" in egress["startupProbe"]["exec"]["command"][2]
    assert {"name": "AGENTBOX_EGRESS_CONFIG", "value": "/etc/agentbox/egress.json"} in egress["env"]
    assert runner["command"] == ["python", "-m", "agentbox.sandbox.runner"]
    assert runner["ports"][0]["containerPort"] == 3284
    env = {item["name"]: item.get("value") for item in runner["env"]}
    assert env["AGENTBOX_RUNTIME"] == "scripted" and env["AGENTBOX_AGENT_MODEL"] == "m1" and env["X"] == "1"
    assert env["AGENTBOX_RUNNER_TOKEN_FILE"] == "/var/run/agentbox/secrets/runner-token"
    assert env["AGENTBOX_SYSTEM_PROMPT_FILE"] == "/etc/agentbox/system-prompt.md"
    assert env["AGENTBOX_GATEWAY_URL"] == "http://127.0.0.1:8765/mcp"
    assert env["AGENTBOX_WORKSPACE"] == "/workspace"
    mounts = {mount["mountPath"] for mount in runner["volumeMounts"]}
    assert mounts == {"/etc/agentbox", "/var/run/agentbox/secrets", "/tmp", "/workspace"}
    assert pod["metadata"]["annotations"] == {naming.CONFIG_HASH_ANNOTATION: "abc",
                                              naming.SPEC_HASH_ANNOTATION: spec_hash(pod["spec"])}


def test_the_spec_hash_follows_what_the_pod_runs_and_nothing_else():
    pod = make_pod(make_session())
    again = make_pod(make_session())
    assert again["metadata"]["annotations"][naming.SPEC_HASH_ANNOTATION] == \
        pod["metadata"]["annotations"][naming.SPEC_HASH_ANNOTATION]
    edited = make_pod(make_session(agent={"runtime": "scripted", "image": "example.com/other:2"}))
    assert edited["metadata"]["annotations"][naming.SPEC_HASH_ANNOTATION] != \
        pod["metadata"]["annotations"][naming.SPEC_HASH_ANNOTATION]


def test_the_runner_says_why_it_gave_up_where_the_kubelet_reads_it():
    (runner,) = make_pod(make_session())["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in runner["env"]}
    assert runner["terminationMessagePath"] == env["AGENTBOX_TERMINATION_MESSAGE_FILE"]
    assert runner["terminationMessagePath"] == "/dev/termination-log"
    assert runner["terminationMessagePolicy"] == "FallbackToLogsOnError"  # a crash says something too
    # A refusal outlives the container's restarts on the pod's /tmp emptyDir, not on the workspace.
    assert env["AGENTBOX_NEEDS_AUTH_FILE"].startswith("/tmp/")


def test_pod_passes_scheduling_fields_and_resources_through():
    tolerations = [{"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}]
    pod = make_pod(
        make_session(
            runtimeClassName="gvisor",
            nodeSelector={"pool": "agents"},
            tolerations=tolerations,
            resources={"limits": {"memory": "4Gi"}},
            agent={"runtime": "custom", "command": ["my-agent"], "args": ["--fast"]},
        )
    )
    spec = pod["spec"]
    assert spec["runtimeClassName"] == "gvisor" and spec["nodeSelector"] == {"pool": "agents"}
    assert spec["tolerations"] == tolerations
    assert spec["containers"][0]["resources"] == {"limits": {"memory": "4Gi"}}
    env = {item["name"]: item.get("value") for item in spec["containers"][0]["env"]}
    assert json.loads(env["AGENTBOX_AGENT_COMMAND"]) == ["my-agent", "--fast"]
    defaults = make_pod(make_session())["spec"]
    assert defaults["containers"][0]["resources"] == {"limits": {"cpu": "1"}}
    assert "runtimeClassName" not in defaults and "tolerations" not in defaults


def test_pod_adds_the_operators_placement_to_the_sessions_own():
    real_node = {"key": "agentbox.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}
    own = {"key": "sandbox", "operator": "Exists", "effect": "NoSchedule"}
    session = make_session(nodeSelector={"pool": "agents", "zone": "b"}, tolerations=[own, real_node])
    pod = build_pod(session, image="img:1", pull_policy="Never", config_digest="abc", runner_resources={},
                    gateway_resources={}, node_selector={"agentbox.dev/real-node": "true", "zone": "a"},
                    tolerations=[real_node])
    assert pod["spec"]["nodeSelector"] == {"agentbox.dev/real-node": "true", "pool": "agents", "zone": "b"}
    assert pod["spec"]["tolerations"] == [real_node, own]
    placed = build_pod(make_session(), image="img:1", pull_policy="Never", config_digest="abc",
                       runner_resources={}, gateway_resources={},
                       node_selector={"agentbox.dev/real-node": "true"}, tolerations=[real_node])
    assert placed["spec"]["nodeSelector"] == {"agentbox.dev/real-node": "true"}
    assert placed["spec"]["tolerations"] == [real_node]


def test_config_hash_follows_configmap_and_secret():
    session = make_session()
    configmap, secret = build_configmap(session, {"a": 1}, {}), build_secret(session, b64("t"), {})
    digest = config_hash(configmap, secret)
    assert digest == config_hash(build_configmap(session, {"a": 1}, {}), build_secret(session, b64("t"), {}))
    assert digest != config_hash(build_configmap(session, {"a": 2}, {}), secret)
    assert digest != config_hash(build_configmap(session, {"a": 1}, {"allow": ["x.org"]}), secret)
    assert digest != config_hash(configmap, build_secret(session, b64("t"), {"mcp-x-token": b64("new")}))


def _secret_files(pod: dict, container: dict) -> set[str]:
    """The Secret keys a container can read: the items of every Secret volume it mounts."""
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    files = set()
    for mount in container["volumeMounts"]:
        secret = volumes[mount["name"]].get("secret")
        if secret is not None:
            assert secret["items"], "a Secret volume without items projects every key"
            files |= {item["path"] for item in secret["items"]}
    return files


def test_the_runner_runs_in_its_runtime_s_image_unless_the_session_names_one():
    def images(session: Session, runner_image: str | None) -> tuple[str, str]:
        pod = build_pod(session, image="sandbox:1", pull_policy="IfNotPresent", config_digest="x",
                        runner_resources={}, gateway_resources={}, runner_image=runner_image)
        return pod["spec"]["initContainers"][0]["image"], pod["spec"]["containers"][0]["image"]

    gemini = make_session(agent={"runtime": "gemini"})
    assert images(gemini, "agent-gemini:1") == ("sandbox:1", "agent-gemini:1")
    assert images(make_session(agent={"runtime": "scripted"}), None) == ("sandbox:1", "sandbox:1")
    own = make_session(agent={"runtime": "gemini", "image": "mine:2"})
    assert images(own, "agent-gemini:1") == ("sandbox:1", "mine:2")


def test_runner_sees_only_its_token_and_the_gateway_only_mcp_credentials():
    session = make_session()
    credentials = {"mcp-github-token": b64("T"), "mcp-github-header-x-api-key": b64("K")}
    secret = build_secret(session, b64("runner"), credentials)
    pod = build_pod(session, image="img:1", pull_policy="IfNotPresent", config_digest="x",
                    runner_resources={}, gateway_resources={}, credential_keys=credentials)
    gateway, egress = pod["spec"]["initContainers"]
    (runner,) = pod["spec"]["containers"]
    assert _secret_files(pod, runner) == {"runner-token"}
    assert _secret_files(pod, gateway) == set(credentials)
    assert _secret_files(pod, egress) == set(), "no provider key: the proxy mounts no secret"
    assert _secret_files(pod, runner) | _secret_files(pod, gateway) == set(secret["data"])
    for container in (runner, gateway):
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/var/run/agentbox/secrets"]
        assert mount["readOnly"] is True
    # No MCP credentials: the gateway mounts no secret at all (empty items would mean every key).
    bare = make_pod(session)
    assert _secret_files(bare, bare["spec"]["initContainers"][0]) == set()
    assert "mcp-secrets" not in {volume["name"] for volume in bare["spec"]["volumes"]}


def test_pvc_and_service():
    pvc = build_pvc(
        make_session(workspace={"size": "5Gi", "storageClassName": "fast", "retainOnDelete": True})
    )
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    assert "storageClassName" not in build_pvc(make_session())["spec"]
    service = build_service(make_session())
    assert (
        service["spec"]["type"] == "ClusterIP"
        and service["spec"]["clusterIP"] == "None"
        and service["spec"]["ports"][0]["port"] == 3284
    )
    assert service["spec"]["selector"] == {
        "app.kubernetes.io/managed-by": "agentbox",
        "agentbox.dev/session": "demo",
    }


def test_session_network_policy():
    policy = build_session_policy(make_session(), "agentbox-system", {"app.kubernetes.io/component": "api"},
                                  [443, 8443])["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    (source,) = policy["ingress"][0]["from"]
    assert source["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "agentbox-system"}
    dns, public = policy["egress"]
    assert {port["port"] for port in dns["ports"]} == {53}
    v4, v6 = public["to"]
    assert v4["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(v4["ipBlock"]["except"])
    assert {"fc00::/7", "fe80::/10"} <= set(v6["ipBlock"]["except"])
    assert public["ports"] == [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}]


def server(spec, phase="Ready"):
    return {"spec": spec, "status": {"phase": phase}}


def test_gateway_config_and_credentials():
    refs = [MCPServerRef(name="github", tools={"allow": ["a", "b"], "deny": ["x"]}), MCPServerRef(name="fs")]
    servers = {
        "github": server(
            {
                "transport": "streamable-http",
                "url": "https://gh/mcp",
                "timeout": "10s",
                "auth": {"type": "bearer", "secretRef": {"name": "gh", "key": "token"}},
                "headers": [
                    {"name": "X-Api-Key", "valueFrom": {"secretKeyRef": {"name": "gh", "key": "k"}}},
                    {"name": "X-Plain", "value": "v"},
                ],
                "tools": {"allow": ["b", "c"], "deny": ["y"]},
            }
        ),
        "fs": server({"transport": "stdio", "stdio": {"command": "npx", "args": ["fs"], "env": {"A": "1"}}}),
    }
    rendered = mcp.render(refs, servers, {"gh": {"token": b64("T"), "k": b64("K")}})
    assert rendered.problems == []
    github, fs = rendered.config["upstreams"]
    assert rendered.config["listen"] == {"host": "127.0.0.1", "port": 8765}
    assert github == {
        "name": "github",
        "transport": "streamable-http",
        "url": "https://gh/mcp",
        "timeoutSeconds": 10.0,
        "tools": {"allow": ["b"], "deny": ["x", "y"]},
        "auth": {"type": "bearer", "tokenFile": "/var/run/agentbox/secrets/mcp-github-token"},
        "headers": [
            {"name": "X-Api-Key", "valueFile": "/var/run/agentbox/secrets/mcp-github-header-x-api-key"},
            {"name": "X-Plain", "value": "v"},
        ],
    }
    assert fs["command"] == "npx" and fs["args"] == ["fs"] and fs["env"] == {"A": "1"} and "url" not in fs
    assert rendered.credentials == {"mcp-github-token": b64("T"), "mcp-github-header-x-api-key": b64("K")}
    assert "T" not in json.dumps(rendered.config).replace("Tool", "").replace("Type", "")


@pytest.mark.parametrize(
    ("servers", "secrets", "reason"),
    [
        ({}, {}, Reason.SERVER_NOT_FOUND),
        (
            {
                "gh": server(
                    {
                        "transport": "sse",
                        "url": "https://x",
                        "auth": {"type": "bearer", "secretRef": {"name": "s", "key": "k"}},
                    }
                )
            },
            {"s": None},
            Reason.SECRET_NOT_FOUND,
        ),
        (
            {"gh": server({"transport": "sse", "url": "https://x"}, phase="Unreachable")},
            {},
            Reason.SERVER_NOT_READY,
        ),
    ],
)
def test_mcp_problems_are_reported_not_raised(servers, secrets, reason):
    rendered = mcp.render([MCPServerRef(name="gh")], servers, secrets)
    assert [problem.reason for problem in rendered.problems] == [reason]
    mounted = [upstream["name"] for upstream in rendered.config["upstreams"]]
    assert mounted == (["gh"] if reason == Reason.SERVER_NOT_READY else [])


def test_referenced_secrets():
    servers = {
        "a": server(
            {
                "auth": {"secretRef": {"name": "s1", "key": "k"}},
                "headers": [{"name": "h", "valueFrom": {"secretKeyRef": {"name": "s2", "key": "k"}}}],
            }
        ),
        "b": None,
    }
    assert mcp.referenced_secrets(servers) == {"s1", "s2"}


def test_tenant_baseline():
    labels = tenant.build_namespace_labels("tenant-acme")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    quota = tenant.build_quota("tenant-acme", {"pods": "5"})
    assert quota["spec"]["hard"] == {"pods": "5"} and quota["metadata"]["namespace"] == "tenant-acme"
    deny = tenant.build_default_deny("tenant-acme")["spec"]
    assert (
        deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny
    )
    assert deny["egress"][0]["ports"][0]["port"] == 53
    limits = tenant.build_limit_range("tenant-acme")["spec"]["limits"]
    assert limits[0]["type"] == "Container" and "default" in limits[0]


def test_stdio_secret_env_reaches_only_the_gateway_as_files():
    spec = {"transport": "stdio", "stdio": {
        "command": "npx", "env": {"MODE": "ro"},
        "envFrom": [{"name": "GITHUB_TOKEN", "secretKeyRef": {"name": "gh", "key": "pat"}},
                    {"name": "GITHUB__TOKEN", "secretKeyRef": {"name": "gh", "key": "other"}}]}}
    servers = {"gh": server(spec)}
    assert mcp.referenced_secrets(servers) == {"gh"}
    rendered = mcp.render([MCPServerRef(name="gh")], servers, {"gh": {"pat": b64("P"), "other": b64("O")}})
    (upstream,) = rendered.config["upstreams"]
    assert upstream["env"] == {"MODE": "ro"}
    assert upstream["envFiles"] == {"GITHUB_TOKEN": "/var/run/agentbox/secrets/mcp-gh-env-GITHUB_TOKEN",
                                    "GITHUB__TOKEN": "/var/run/agentbox/secrets/mcp-gh-env-GITHUB__TOKEN"}
    assert rendered.credentials == {"mcp-gh-env-GITHUB_TOKEN": b64("P"), "mcp-gh-env-GITHUB__TOKEN": b64("O")}
    pod = build_pod(make_session(), image="i", pull_policy="IfNotPresent", config_digest="x",
                    runner_resources={}, gateway_resources={}, credential_keys=rendered.credentials)
    assert _secret_files(pod, pod["spec"]["initContainers"][0]) == set(rendered.credentials)
    assert _secret_files(pod, pod["spec"]["containers"][0]) == {"runner-token"}
    missing = mcp.render([MCPServerRef(name="gh")], servers, {"gh": {"pat": b64("P")}})
    assert [problem.reason for problem in missing.problems] == [Reason.SECRET_NOT_FOUND]
    assert "gh/other" in missing.problems[0].message


# The egress proxy and the provider key -------------------------------------------------------------------

PROVIDER_KEY_VALUE = "sk-ant-real-0123456789"


def _keyed_session(**spec) -> Session:
    return make_session(egress={"allow": ["api.github.com"],
                                "providerKey": {"name": "keys", "key": "anthropic"}}, **spec)


def test_the_provider_key_is_mounted_into_the_egress_proxy_alone():
    session = _keyed_session()
    secret = build_secret(session, b64("runner"),
                          {"mcp-gh-token": b64("T"), "provider-key": b64(PROVIDER_KEY_VALUE)})
    pod = build_pod(session, image="img:1", pull_policy="IfNotPresent", config_digest="x",
                    runner_resources={}, gateway_resources={}, credential_keys={"mcp-gh-token": b64("T")},
                    provider_key=True)
    gateway, egress = pod["spec"]["initContainers"]
    (runner,) = pod["spec"]["containers"]
    assert egress["name"] == "egress" and egress["restartPolicy"] == "Always", "a native sidecar"
    assert egress["command"] == ["python", "-m", "agentbox.sandbox.egress"]
    assert _secret_files(pod, egress) == {"provider-key"}
    assert _secret_files(pod, gateway) == {"mcp-gh-token"}
    assert _secret_files(pod, runner) == {"runner-token"}
    assert set(secret["data"]) == _secret_files(pod, egress) | _secret_files(pod, gateway) | _secret_files(
        pod, runner)
    (mount,) = [m for m in egress["volumeMounts"] if m["name"] == "egress-secrets"]
    assert mount == {"name": "egress-secrets", "mountPath": "/var/run/agentbox/egress", "readOnly": True}


@pytest.mark.parametrize(("runtime", "key_variable", "base_url_variable", "route"), [
    ("claude-code", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL", "http://127.0.0.1:8766/anthropic"),
    ("gemini", "GEMINI_API_KEY", "GOOGLE_GEMINI_BASE_URL", "http://127.0.0.1:8766/gemini"),
    ("codex", "OPENAI_API_KEY", "OPENAI_BASE_URL", "http://127.0.0.1:8766/openai"),
])
def test_the_runner_gets_the_placeholder_and_the_proxy_route(runtime, key_variable, base_url_variable,
                                                            route):
    session = make_session(agent={"runtime": runtime}, egress={"providerKey": {"name": "keys", "key": "k"}})
    pod = build_pod(session, image="img:1", pull_policy="IfNotPresent", config_digest="x",
                    runner_resources={}, gateway_resources={}, provider_key=True)
    env = {item["name"]: item["value"] for item in pod["spec"]["containers"][0]["env"]}
    assert env[key_variable] == "agentbox-placeholder-key"
    assert env[base_url_variable] == route
    assert env["HTTPS_PROXY"] == env["https_proxy"] == "http://127.0.0.1:8767"
    assert env["NO_PROXY"] == "127.0.0.1,localhost,::1"
    assert env["NODE_USE_ENV_PROXY"] == "1", "Node.js agents' own fetch() goes through the proxy too"
    assert not any(item.get("valueFrom") for item in pod["spec"]["containers"][0]["env"]), \
        "nothing in the runner's environment comes from a Secret"


def test_without_a_provider_key_the_agent_gets_no_provider_variables():
    pod = make_pod(make_session(egress={"allow": ["api.github.com"]}))
    env = {item["name"] for item in pod["spec"]["containers"][0]["env"]}
    assert "HTTPS_PROXY" in env, "every agent goes out through the proxy"
    assert not env & {"ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"}
    assert "egress-secrets" not in {volume["name"] for volume in pod["spec"]["volumes"]}


def test_egress_json_names_the_key_file_and_never_holds_the_key():
    from agentbox.operator.build.egress import egress_config

    session = _keyed_session()
    config = egress_config(session, has_key=True, default_allow=["*.npmjs.org", "api.github.com"])
    assert config["allow"] == ["*.npmjs.org", "api.github.com"]
    assert config["provider"] == {"name": "anthropic", "upstream": "https://api.anthropic.com",
                                  "keyHeader": "x-api-key", "keyPrefix": "",
                                  "keyFile": "/var/run/agentbox/egress/provider-key"}
    configmap = build_configmap(session, {}, config)
    assert PROVIDER_KEY_VALUE not in json.dumps(configmap)
    assert json.loads(configmap["data"]["egress.json"]) == config
    faked = egress_config(session, has_key=True, default_allow=[],
                          upstreams={"anthropic": "http://127.0.0.1:9999"})
    assert faked["provider"]["upstream"] == "http://127.0.0.1:9999"
    assert "provider" not in egress_config(session, has_key=False, default_allow=[])


def test_egress_ports_are_https_and_the_mcp_servers_own():
    from agentbox.operator.build.egress import egress_ports

    assert egress_ports([]) == [443]
    assert egress_ports(["https://mcp.example.com/mcp", "https://x.example.com:8443/sse",
                         "http://plain.example.com/mcp"]) == [80, 443, 8443]


def test_the_proxy_accepts_the_egress_json_the_operator_renders(tmp_path):
    from agentbox.operator.build.egress import egress_config
    from agentbox.sandbox.egress.config import load

    for runtime in ("claude-code", "gemini", "codex"):
        session = _keyed_session(agent={"runtime": runtime})
        path = tmp_path / "egress.json"
        path.write_text(build_configmap(session, {}, egress_config(
            session, has_key=True, default_allow=["*.npmjs.org"]))["data"]["egress.json"])
        config = load(path)
        assert config.provider is not None and config.provider.upstream.startswith("https://")
        assert config.allow == ["*.npmjs.org", "api.github.com"] and config.connect_ports == [443]
        assert config.allow_private_networks is False
