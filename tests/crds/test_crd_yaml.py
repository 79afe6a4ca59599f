"""The CRD YAML on disk is exactly what the models generate, and it is a structural schema."""

import json
from pathlib import Path

import yaml

from agentbox.crds import generate

CRD_DIR = Path(generate.__file__).resolve().parent


def _walk(node, path="$"):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}[{index}]")


def test_yaml_on_disk_is_current():
    for name, text in generate.render().items():
        on_disk = (CRD_DIR / name).read_text()
        assert on_disk == text, f"crds/{name} is stale: run `make crds`"


def test_schemas_are_structural():
    for name, text in generate.render().items():
        if name == "kopf-peering.yaml":
            continue
        schema = yaml.safe_load(text)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in _walk(schema):
            for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "$defs", "const"):
                assert forbidden not in node or path.endswith(".properties"), f"{forbidden} at {path}"
            if "properties" in node and not path.endswith(".properties"):
                assert node.get("type") == "object", f"{path} has properties but no type object"


def test_names_columns_and_subresource():
    crds = {yaml.safe_load(text)["spec"]["names"]["kind"]: yaml.safe_load(text)
            for name, text in generate.render().items() if name != "kopf-peering.yaml"}
    session, server = crds["AgentSession"]["spec"], crds["MCPServer"]["spec"]
    assert session["names"]["shortNames"] == ["ags"] and server["names"]["shortNames"] == ["mcps"]
    assert session["names"]["categories"] == ["agentbox"] == server["names"]["categories"]
    for spec in (session, server):
        assert spec["versions"][0]["subresources"] == {"status": {}}
    visible = [c["name"] for c in session["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert visible == ["Org", "User", "Runtime", "Phase", "Age"]
    visible = [c["name"] for c in server["versions"][0]["additionalPrinterColumns"] if not c.get("priority")]
    assert visible == ["Transport", "Phase", "Tools", "Age"]


def test_cel_rules_are_present_and_name_fields():
    session = yaml.safe_load(generate.render()["agentsessions.agentbox.dev.yaml"])
    spec = session["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["tenant"]["properties"]["org"]["x-kubernetes-validations"][0]["rule"] == "self == oldSelf"
    positive = spec["workspace"]["properties"]["size"]["x-kubernetes-validations"][0]
    assert "oldSelf" not in positive["rule"] and positive["message"] == "must be greater than zero"
    session_rules = {rule["fieldPath"]: rule for rule in session["spec"]["versions"][0]["schema"][
        "openAPIV3Schema"]["properties"]["spec"]["x-kubernetes-validations"] if "fieldPath" in rule}
    assert set(session_rules) == {".workspace.size", ".workspace.storageClassName"}
    assert all("oldSelf" in rule["rule"] and rule["message"].startswith("spec" + path)
               for path, rule in session_rules.items())
    pool = yaml.safe_load(generate.render()["agentsessionpools.agentbox.dev.yaml"])
    assert "oldSelf" not in json.dumps(pool)  # a pool's template is no claim: it may change at will
    server = yaml.safe_load(generate.render()["mcpservers.agentbox.dev.yaml"])
    rules = server["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"]
    assert {rule["fieldPath"] for rule in rules} == {".url", ".stdio"}
    assert all(rule["message"].startswith(("spec.url", "spec.stdio")) for rule in rules)


def test_pass_through_kubernetes_types_preserve_unknown_fields():
    session = yaml.safe_load(generate.render()["agentsessions.agentbox.dev.yaml"])
    spec = session["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert spec["resources"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["tolerations"]["items"]["x-kubernetes-preserve-unknown-fields"] is True
    assert spec["agent"]["properties"]["env"]["items"]["properties"]["valueFrom"][
        "x-kubernetes-preserve-unknown-fields"] is True
    assert "x-kubernetes-preserve-unknown-fields" not in spec["agent"]
