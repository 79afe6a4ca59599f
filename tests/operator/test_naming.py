"""Names and label values: deterministic, short enough, distinct for distinct inputs."""

import re

import pytest

from agentbox.operator import naming

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
AWKWARD = [
    "s",
    "My.Session",
    "a" * 253,
    "a" * 252 + "b",
    "x--y",
    "-",
    "über.session",
    "a.b.c",
    "ñ",
    "---a---",
]


@pytest.mark.parametrize("name", AWKWARD)
def test_child_names_are_dns_labels(name):
    child = naming.child_name(name)
    assert len(child) <= 63 and DNS_LABEL.match(child)
    assert naming.child_name(name) == child


def test_child_names_do_not_collide():
    names = [*AWKWARD, "My-Session", "my.session", "my-session"]
    assert len({naming.child_name(name) for name in names}) == len(names)


@pytest.mark.parametrize("text", ["ada@example.com", "Ada Lovelace", "x" * 100, "ok-value", "", "ünïcode"])
def test_label_values_are_valid(text):
    value = naming.label_value(text)
    assert len(value) <= 63 and LABEL_VALUE.match(value)


def test_valid_label_values_pass_through_and_others_are_hashed_apart():
    assert naming.label_value("acme") == "acme"
    assert naming.label_value("Ada Lovelace") != naming.label_value("ada-lovelace")


def test_credential_keys_and_endpoint():
    assert naming.credential_key("github", "token") == "mcp-github-token"
    assert naming.credential_key("github", "header-X-Api-Key") == "mcp-github-header-x-api-key"
    assert naming.endpoint(naming.child_name("s1"), "tenant-acme") == f"http://{naming.child_name('s1')}.tenant-acme.svc:3284"
