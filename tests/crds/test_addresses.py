"""The address policy the API and the operator share (agentbox.crds.addresses): which addresses a
connection made on a tenant's say-so may reach, and who a refusal names. The pinned connection and the
API's checked client are exercised against a real server in tests/api/test_egress.py."""

import ipaddress

import pytest

from agentbox.crds import addresses

ALWAYS_REFUSED = ["169.254.169.254", "fe80::1", "fd00:ec2::254", "0.0.0.0",  # noqa: S104 (classified only)
                  "224.0.0.1", "240.0.0.1", "::ffff:169.254.169.254"]
PRIVATE = ["127.0.0.1", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "fc00::1", "100.64.0.1"]
PUBLIC = ["1.1.1.1", "2606:4700:4700::1111"]


@pytest.mark.parametrize("address", ALWAYS_REFUSED)
def test_metadata_link_local_and_special_addresses_are_never_contacted(address):
    assert addresses.refusal(ipaddress.ip_address(address), allow_private=True) is not None


@pytest.mark.parametrize("address", PRIVATE)
def test_private_and_loopback_addresses_need_the_setting(address):
    assert addresses.refusal(ipaddress.ip_address(address), allow_private=False) is not None
    assert addresses.refusal(ipaddress.ip_address(address), allow_private=True) is None


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_are_contacted(address):
    assert addresses.refusal(ipaddress.ip_address(address), allow_private=False) is None


async def test_a_refusal_names_who_would_have_connected():
    with pytest.raises(addresses.RefusedAddress, match=r"loopback .*, which the operator does not contact"):
        await addresses.resolve_allowed("127.0.0.1", allow_private=False, who="the operator")
    with pytest.raises(addresses.RefusedAddress, match="which the API does not contact"):
        await addresses.resolve_allowed("169.254.169.254", allow_private=True)
