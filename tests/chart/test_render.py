"""The Helm chart as `helm template` renders it: no cluster, only the helm binary `make binaries` builds.

What a rendered manifest can show: hook ordering, render-time failures, which objects a value turns on,
RBAC verbs, environment entries. Installing and RBAC in use are tests/chart/test_chart.py's.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from fixtures.cluster import cache_dir, read_versions

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "agentbox"
HELM = cache_dir() / "bin" / f"helm-{read_versions()['HELM_VERSION']}" / "helm"
REQUIRED = ("--set", "jwt.issuer=https://auth.example.test/auth/v1",
            "--set", "jwt.jwksUrl=https://auth.example.test/auth/v1/.well-known/jwks.json",
            "--set", "database.url=postgresql://agentbox_app@db.example.test/agentbox")

pytestmark = pytest.mark.skipif(not HELM.is_file(), reason=f"no helm at {HELM}: run `make binaries`")


def helm_template(*values: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HELM, "template", "abx", CHART, "--namespace", "abx-system", *values],
                          capture_output=True, text=True, timeout=60, check=False)


def render(*values: str) -> dict[tuple[str, str], dict]:
    """The rendered objects by (kind, name)."""
    done = helm_template(*REQUIRED, *values)
    assert done.returncode == 0, done.stderr
    return {(o["kind"], o["metadata"]["name"]): o for o in yaml.safe_load_all(done.stdout) if o}


def render_fails(*values: str) -> str:
    done = helm_template(*values)
    assert done.returncode != 0, "rendered, but should have failed"
    return done.stderr


def hook(obj: dict) -> tuple[str, int, str]:
    annotations = obj["metadata"].get("annotations") or {}
    return (annotations.get("helm.sh/hook", ""), int(annotations.get("helm.sh/hook-weight", "0")),
            annotations.get("helm.sh/hook-delete-policy", ""))


def pod_spec(obj: dict) -> dict:
    return obj["spec"] if obj["kind"] == "Pod" else obj["spec"]["template"]["spec"]


def test_the_migration_job_s_secret_is_a_hook_created_before_it():
    objects = render()
    job = objects["Job", "abx-agentbox-migrate-1"]
    (env,) = pod_spec(job)["containers"][0]["env"]
    secret_name = env["valueFrom"]["secretKeyRef"]["name"]
    secret = objects["Secret", secret_name]
    assert env["valueFrom"]["secretKeyRef"]["key"] in secret["stringData"]
    # Both run before any release resource, the Secret first; it goes once the Job has ended.
    secret_hook, job_hook = hook(secret), hook(job)
    assert secret_hook[0] == job_hook[0] == "pre-install,pre-upgrade"
    assert secret_hook[1] < job_hook[1]
    assert secret_hook[2].split(",") == ["before-hook-creation", "hook-succeeded"]
    # The Deployments' Secret is an ordinary release resource, and holds the application role's URL only.
    database = objects["Secret", "abx-agentbox-database"]
    assert hook(database) == ("", 0, "") and list(database["stringData"]) == ["url"]

    # Without migrations there is no hook; with the user's own Secret the Job reads that one.
    assert ("Secret", secret_name) not in render("--set", "database.runMigrations=false")
    mine = render("--set", "database.existingSecret=mine")
    assert not any(kind == "Secret" and "database" in name for kind, name in mine)
    (env,) = pod_spec(mine["Job", "abx-agentbox-migrate-1"])["containers"][0]["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "mine", "key": "migrationsUrl"}


def test_without_a_token_key_source_the_chart_refuses_to_render():
    issuer_and_database = ("--set", "jwt.issuer=https://auth.example.test/auth/v1",
                           "--set", "database.url=postgresql://agentbox_app@db.example.test/agentbox")
    error = render_fails(*issuer_and_database)
    assert "jwt.jwksUrl or jwt.hs256.existingSecret is required" in error
    assert "will not start" in error
    for source in ("jwt.jwksUrl=https://auth.example.test/jwks", "jwt.hs256.existingSecret=jwt"):
        assert helm_template(*issuer_and_database, "--set", source).returncode == 0, source


def test_the_notes_onboard_an_org_with_the_fields_the_api_requires():
    # `helm template` leaves NOTES.txt out and `helm install --dry-run` needs a cluster: the text itself.
    notes = (CHART / "templates" / "NOTES.txt").read_text()
    assert """-d '{"id": "acme", "name": "Acme"}'""" in notes
    assert "refuse every token" not in notes


def pods_of(objects: dict[tuple[str, str], dict]) -> dict[str, dict]:
    return {name: pod_spec(o) for (kind, name), o in objects.items() if kind in ("Deployment", "Job", "Pod")}


def test_every_pod_of_the_chart_may_pull_from_a_private_registry():
    pods = pods_of(render("--set", "imagePullSecrets[0].name=registry"))
    assert set(pods) == {"abx-agentbox-operator", "abx-agentbox-api", "abx-agentbox-migrate-1",
                         "abx-agentbox-test-api"}
    for name, pod in pods.items():
        assert pod.get("imagePullSecrets") == [{"name": "registry"}], name
    assert not any("imagePullSecrets" in pod for pod in pods_of(render()).values())


@pytest.mark.parametrize(("values", "budgets"), [
    ([], {"api", "operator"}),
    (["--set", "api.replicas=1"], {"operator"}),
    (["--set", "operator.replicas=1", "--set", "api.replicas=3"], {"api"}),
    (["--set", "operator.replicas=1", "--set", "api.replicas=1"], set()),
    (["--set", "podDisruptionBudget.enabled=false"], set()),
])
def test_a_disruption_budget_only_for_a_component_with_replicas_to_spare(values, budgets):
    objects = render(*values)
    rendered = {name.removeprefix("abx-agentbox-") for kind, name in objects if kind == "PodDisruptionBudget"}
    assert rendered == budgets
    for component in budgets:
        budget = objects["PodDisruptionBudget", f"abx-agentbox-{component}"]
        assert budget["spec"]["minAvailable"] == 1
        assert budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component


def operator_rules(objects: dict[tuple[str, str], dict]) -> list[dict]:
    return objects["ClusterRole", "abx-agentbox-operator"]["rules"]


def test_the_operator_may_update_only_finalizers_and_may_create_its_peering():
    rules = operator_rules(render())
    updated = sorted(resource for rule in rules if "update" in rule["verbs"]
                     for resource in rule["resources"])
    # It writes with PATCH alone; `update` on finalizers is what owner references that block deletion need.
    assert updated == ["agentsessionpools/finalizers", "agentsessions/finalizers",
                       "clusteragentsessionpools/finalizers"]
    (peering,) = [rule for rule in rules if "clusterkopfpeerings" in rule["resources"]]
    assert {"get", "create", "patch"} <= set(peering["verbs"])


def operator_container(objects: dict[tuple[str, str], dict]) -> dict:
    (container,) = pod_spec(objects["Deployment", "abx-agentbox-operator"])["containers"]
    return container


def test_extra_settings_reach_the_operator():
    extra = [{"name": "AGENTBOX_SECRET_CHECK_SECONDS", "value": "30"},
             {"name": "AGENTBOX_RUNNER_RESOURCES", "value": '{"requests": {"cpu": "500m", "memory": "1Gi"}}'}]
    env = operator_container(render("--set-json", f"operator.extraEnv={json.dumps(extra)}"))["env"]
    assert env[-2:] == extra
    defaults = [entry["name"] for entry in operator_container(render())["env"]]
    assert [entry["name"] for entry in env] == [*defaults, "AGENTBOX_SECRET_CHECK_SECONDS",
                                                "AGENTBOX_RUNNER_RESOURCES"]
    # Only AGENTBOX_* settings, as for the API.
    error = render_fails(*REQUIRED, "--set", "operator.extraEnv[0].name=PATH",
                         "--set", "operator.extraEnv[0].value=/tmp")
    assert "at '/operator/extraEnv/0/name'" in error
