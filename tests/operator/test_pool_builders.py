"""Pool members without a cluster: a member's pod is the pod of any session of its template, and the
handover makes each of its children the claiming session's."""

from agentbox.crds.agentsession import AgentSessionSpec, SandboxTemplate
from agentbox.operator import naming
from agentbox.operator.build import mcp
from agentbox.operator.build.common import Session
from agentbox.operator.build.pod import member_hash, template_hash
from agentbox.operator.build.pool import (
    MEMBER_KINDS,
    handover,
    is_pool_token,
    member_name,
    member_session,
    owned_by_pool,
    pool_token,
)
from agentbox.operator.build.secret import RUNNER_TOKEN_KEY
from agentbox.operator.rendering import Rendering
from agentbox.operator.settings import OperatorSettings

POOL = {"metadata": {"name": "claude-warm", "namespace": "tenant-acme", "uid": "pool-uid", "generation": 1}}
TEMPLATE = {"agent": {"runtime": "claude-code", "env": [{"name": "EDITOR", "value": "vi"}]},
            "egress": {"allow": ["api.github.com"]}}


def rendering(credentials: dict[str, str] | None = None, provider_key: str | None = None) -> Rendering:
    rendered = mcp.RenderedMCP({"upstreams": []}, credentials or {})
    return Rendering(OperatorSettings(), rendered, provider_key, None)


def session(name: str, **spec) -> Session:
    body = {**TEMPLATE, "tenant": {"org": "acme", "user": f"{name}@example.com"}, **spec}
    return Session(name, "tenant-acme", f"uid-{name}", AgentSessionSpec.model_validate(body))


def hash_of(render: Rendering, who: Session, token: str = "dG9rZW4=") -> str:  # noqa: S107 (a test token)
    children = render.children(who, token)
    return template_hash(render.pod(who, children), children["ConfigMap"], children["Secret"])


def test_a_member_hashes_like_every_session_of_its_template_whatever_its_identity():
    render = rendering()
    template = SandboxTemplate.model_validate(TEMPLATE)
    member = member_session(POOL, template, member_name("claude-warm"), "acme")
    wanted = hash_of(render, member, pool_token())
    ada = session("ada", systemPrompt="you help Ada")
    bob = session("bob", systemPrompt="you help Bob", lifecycle={"idleTimeout": "5m"})
    assert hash_of(render, ada) == wanted == hash_of(render, bob, "b3RoZXI=")


def test_anything_that_shapes_the_pod_changes_the_hash():
    render = rendering()
    base = hash_of(render, session("ada"))
    variants = [
        hash_of(render, session("ada", agent={"runtime": "gemini"})),
        hash_of(render, session("ada", agent={"runtime": "claude-code", "image": "mine:1"})),
        hash_of(render, session("ada", agent={"runtime": "claude-code",
                                             "env": [{"name": "EDITOR", "value": "ed"}]})),
        hash_of(render, session("ada", resources={"limits": {"cpu": "2"}})),
        hash_of(rendering(provider_key="a2V5"), session("ada")),  # the egress proxy mounts the key
        hash_of(rendering(credentials={"mcp-gh-token": "dA=="}), session("ada")),  # the gateway mounts it
        hash_of(rendering(provider_key="b3RoZXI="), session("ada")),  # the proxy reads it at start
        hash_of(render, session("ada", egress={"allow": ["example.com"]})),  # so does its allow-list
    ]
    hashes = variants
    assert base not in hashes and len(set(hashes)) == len(hashes)


def test_a_member_belongs_to_its_pool_and_to_no_session():
    render = rendering()
    name = member_name("claude-warm")
    member = member_session(POOL, SandboxTemplate.model_validate(TEMPLATE), name, "acme")
    children = render.children(member, pool_token())
    manifests = [owned_by_pool(children[kind], POOL, "h1") for kind in MEMBER_KINDS[:-1]]
    manifests.append(owned_by_pool(render.pod(member, children), POOL, "h1"))
    for manifest in manifests:
        meta = manifest["metadata"]
        assert meta["name"] == name and name.startswith("claude-warm-")
        assert meta["labels"] == {naming.MANAGED_BY: naming.MANAGER, naming.POOL_LABEL: "claude-warm",
                                  naming.TEMPLATE_HASH_LABEL: "h1"}
        assert [ref["uid"] for ref in meta["ownerReferences"]] == ["pool-uid"]
    secret = manifests[1]
    assert is_pool_token(secret["data"][RUNNER_TOKEN_KEY]) and not is_pool_token("dG9rZW4=")
    assert member.spec.system_prompt == "" and children["ConfigMap"]["data"]["system-prompt.md"] == ""


def test_the_handover_makes_the_pod_the_sessions_on_the_version_read():
    ada = session("ada")
    claimant = Session("ada", "tenant-acme", ada.uid, ada.spec, member="claude-warm-1a2b3c4d")
    render = rendering()
    desired_pod = render.pod(claimant, render.children(claimant, "dG9rZW4="))
    patch = handover(claimant, "claude-warm", desired_pod, "41")["metadata"]
    assert patch["resourceVersion"] == "41"
    labels = patch["labels"]
    assert labels[naming.SESSION_LABEL] == "ada" and labels[naming.CLAIMED_FROM_LABEL] == "claude-warm"
    assert labels[naming.POOL_LABEL] is None and labels[naming.TEMPLATE_HASH_LABEL] is None
    assert patch["ownerReferences"] == [ada.owner_reference()]
    # The config hash of the session's own ConfigMap and Secret: the full pass finds the pod current.
    assert patch["annotations"] == desired_pod["metadata"]["annotations"]
    assert "resourceVersion" not in handover(claimant, "claude-warm", desired_pod, None)["metadata"]


def test_a_claimed_session_names_its_children_after_its_member():
    assert naming.session_child_name("ada", None) == naming.child_name("ada")
    assert naming.session_child_name("ada", {naming.POOL_MEMBER_ANNOTATION: "claude-warm-1a2b3c4d"}) == \
        "claude-warm-1a2b3c4d"
    claimed = Session("ada", "tenant-acme", "uid", session("ada").spec, member="claude-warm-1a2b3c4d")
    assert rendering().children(claimed, "dA==")["Service"]["metadata"]["name"] == "claude-warm-1a2b3c4d"


def test_a_members_workspace_class_and_size_are_part_of_what_a_claim_matches():
    render = rendering()

    def matched(who: Session) -> str:
        children = render.children(who, "dG9rZW4=")
        return member_hash(hash_of(render, who), children["PersistentVolumeClaim"])

    base = matched(session("ada"))
    assert matched(session("bob", workspace={"retainOnDelete": True})) == base  # an annotation: applied
    variants = [matched(session("ada", workspace={"size": "10Gi"})),
                matched(session("ada", workspace={"storageClassName": "fast"}))]
    assert base not in variants and len(set(variants)) == len(variants)
