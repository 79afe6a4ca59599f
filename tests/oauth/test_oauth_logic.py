"""The OAuth client's pure parts, and discovery against the test authorization server on 127.0.0.1."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from agentbox.api import oauth

from .authserver import AuthServer, Behaviour
from .conftest import serve


def test_pkce_s256_matches_rfc_7636_appendix_b():
    assert oauth.code_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == \
        "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    verifier = oauth.new_code_verifier()
    assert 43 <= len(verifier) <= 128 and verifier != oauth.new_code_verifier()


def test_state_carries_the_org_and_only_its_hash_is_kept():
    state = oauth.new_state("acme")
    assert oauth.state_org(state) == "acme"
    assert len(oauth.state_hash(state)) == 32
    assert oauth.state_hash(state) != oauth.state_hash(oauth.new_state("acme"))
    for bad in (None, "", "acme", "acme.short", "Not_An_Org." + "x" * 43, "a" * 300):
        assert oauth.state_org(bad) is None


def test_bearer_challenge_parameters():
    header = ('Basic realm="x", Bearer error="invalid_token", resource_metadata="https://r.example/prm", '
              'scope="a b", Foo k=v')
    assert oauth.bearer_challenge(header) == {"error": "invalid_token",
                                              "resource_metadata": "https://r.example/prm", "scope": "a b"}
    assert oauth.bearer_challenge('Basic realm="x"') == {}
    assert oauth.bearer_challenge(None) == {}


def test_well_known_urls_path_then_root_and_rfc8414_then_openid():
    assert oauth.protected_resource_metadata_urls("https://h.example/v1/mcp/") == [
        "https://h.example/.well-known/oauth-protected-resource/v1/mcp",
        "https://h.example/.well-known/oauth-protected-resource"]
    assert oauth.authorization_server_metadata_urls("https://h.example/tenant") == [
        "https://h.example/.well-known/oauth-authorization-server/tenant",
        "https://h.example/.well-known/openid-configuration/tenant",
        "https://h.example/tenant/.well-known/openid-configuration"]
    assert oauth.authorization_server_metadata_urls("https://h.example") == [
        "https://h.example/.well-known/oauth-authorization-server",
        "https://h.example/.well-known/openid-configuration"]


METADATA = {"issuer": "https://as.example", "authorization_endpoint": "https://as.example/authorize",
            "token_endpoint": "https://as.example/token", "code_challenge_methods_supported": ["S256"]}


def test_server_metadata_checks():
    assert oauth.check_server_metadata(METADATA, "https://as.example").issuer == "https://as.example"
    with pytest.raises(oauth.DiscoveryError, match="names issuer"):
        oauth.check_server_metadata(METADATA, "https://as.example/")  # a lying or confused provider
    with pytest.raises(oauth.DiscoveryError, match="code_challenge_methods_supported"):
        oauth.check_server_metadata({**METADATA, "code_challenge_methods_supported": None}, "https://as.example")
    with pytest.raises(oauth.DiscoveryError, match="S256"):
        oauth.check_server_metadata({**METADATA, "code_challenge_methods_supported": ["plain"]},
                                    "https://as.example")
    with pytest.raises(oauth.DiscoveryError, match="https"):
        oauth.check_server_metadata({**METADATA, "token_endpoint": "http://as.example/token"},
                                    "https://as.example")
    with pytest.raises(oauth.DiscoveryError, match="malformed"):
        oauth.check_server_metadata({"issuer": "https://as.example"}, "https://as.example")


def test_protected_resource_must_name_this_server():
    document = {"resource": "https://mcp.example/mcp", "authorization_servers": ["https://as.example"]}
    checked = oauth.check_protected_resource(document, "https://mcp.example/mcp")
    assert checked.resource == document["resource"]
    with pytest.raises(oauth.DiscoveryError, match="names resource"):
        oauth.check_protected_resource(document, "https://other.example/mcp")
    with pytest.raises(oauth.DiscoveryError, match="names resource"):
        oauth.check_protected_resource(document, "https://mcp.example/mcp-other")


def test_authorization_url_has_pkce_s256_resource_and_scopes():
    url = oauth.authorization_url("https://as.example/authorize?tenant=1", client_id="c", redirect_uri="https://api/cb",
                                  state="acme.s", challenge="ch", resource="https://mcp.example/mcp",
                                  scopes=["a", "b"], extra={"prompt": "consent"})
    query = parse_qs(urlsplit(url).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"] == ["ch"]
    assert query["resource"] == ["https://mcp.example/mcp"] and query["scope"] == ["a b"]
    assert query["tenant"] == ["1"] and query["prompt"] == ["consent"] and query["response_type"] == ["code"]


def test_presets_are_data_and_match_by_host():
    presets = oauth.load_presets()
    assert {p.name for p in presets} >= {"github", "google", "microsoft", "atlassian"}
    github = next(p for p in presets if p.name == "github")
    assert github.matches("https://api.githubcopilot.com/mcp/") and not github.matches("https://notgithub.com/")
    assert oauth.sends_resource("https://login.microsoftonline.com/common/v2.0", presets) is False
    assert oauth.sends_resource("https://any.example", presets) is True


def test_refresh_due_and_token_reprs_hide_secrets():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert oauth.refresh_due(now + timedelta(seconds=30), now, timedelta(minutes=1))
    assert not oauth.refresh_due(now + timedelta(minutes=5), now, timedelta(minutes=1))
    assert not oauth.refresh_due(None, now, timedelta(minutes=1))
    tokens = oauth.TokenSet(access_token="at-secret", refresh_token="rt-secret", expires_in=60)
    assert "secret" not in repr(tokens) and "secret" not in str(tokens)
    assert "s3cret" not in repr(oauth.Client("id", "s3cret", "client_secret_basic"))


async def test_keyed_locks_serialise_one_key_only():
    locks, order = oauth.KeyedLocks(), []

    async def hold(key: str, tag: str) -> None:
        async with locks.hold(key):
            order.append(f"{tag}+")
            await asyncio.sleep(0.01)
            order.append(f"{tag}-")

    await asyncio.gather(hold("a", "1"), hold("a", "2"), hold("b", "3"))
    assert order.index("1-") < order.index("2+")
    assert order.index("3+") < order.index("1-")


@pytest.mark.parametrize("behaviour", [Behaviour(prm_location="header"), Behaviour(prm_location="path"),
                                       Behaviour(prm_location="root", metadata_kind="openid")],
                         ids=["www-authenticate", "well-known-path", "well-known-root-openid"])
async def test_discovery_paths(behaviour):
    server = AuthServer(behaviour)
    async with serve(server.app()) as base, httpx.AsyncClient() as http:
        server.base_url = base
        found = await oauth.discover(http, f"{base}/mcp", [])
    assert found.metadata.issuer == server.issuer and found.resource == server.resource
    assert found.metadata.token_endpoint == f"{server.issuer}/token"
    if behaviour.prm_location == "header":
        assert found.scopes == ["mcp:tools"] and server.calls["prm-path"] == 0
    if behaviour.prm_location == "root":
        assert server.calls["prm-path"] == 1 and server.calls["oauth-metadata"] == 1


@pytest.mark.parametrize(("behaviour", "message"), [
    (Behaviour(lie_about_issuer=True), "names issuer"),
    (Behaviour(pkce_methods=None), "code_challenge_methods_supported"),
    (Behaviour(pkce_methods=["plain"]), "S256")])
async def test_discovery_refuses_untrustworthy_servers(behaviour, message):
    server = AuthServer(behaviour)
    async with serve(server.app()) as base, httpx.AsyncClient() as http:
        server.base_url = base
        with pytest.raises(oauth.DiscoveryError, match=message):
            await oauth.discover(http, f"{base}/mcp", [])


async def test_discovery_of_a_server_that_is_down():
    async with serve(AuthServer().app()) as base:
        pass
    async with httpx.AsyncClient() as http:
        with pytest.raises(oauth.ProviderUnavailable):
            await oauth.discover(http, f"{base}/mcp", [])


def test_token_bucket_grants_a_minutes_worth_then_counts_what_it_refuses():
    now = [0.0]
    bucket = oauth.TokenBucket(3, clock=lambda: now[0])
    assert [bucket.take() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 20  # a third of a minute: one token back
    assert [bucket.take(), bucket.take()] == [2, None]
    now[0] += 3600  # refills to the burst size, no further
    assert [bucket.take() for _ in range(4)] == [1, 0, 0, None]
