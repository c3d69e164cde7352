"""The public-address rule: an explicit table of IANA special-purpose ranges, the same on every Python.

Nothing here connects anywhere: the rule is a pure function of the address text.
"""

from __future__ import annotations

import ipaddress

import pytest

from segnext_backend.addresses import NON_PUBLIC_IPV4, NON_PUBLIC_IPV6, is_public

NOT_PUBLIC = [
    "192.0.0.8",  # public to Python 3.11.7's ipaddress, an IETF protocol assignment to IANA
    "192.0.0.9",  # globally reachable anycast to IANA; refused with its block on purpose
    "0.0.0.0", "10.1.2.3", "100.64.0.1", "100.127.255.255", "127.0.0.1", "169.254.169.254", "172.16.0.1",
    "172.31.255.255", "192.0.2.1", "192.88.99.1", "192.168.1.1", "198.18.0.1", "198.19.255.255",
    "198.51.100.1", "203.0.113.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
    "::", "::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:192.0.0.8", "64:ff9b::7f00:1", "100::1",
    "2001::1", "2001:db8::1", "2001:1::1", "2002:7f00:1::1", "3fff::1", "5f00::1", "fc00::1", "fd12:3456::1",
    "fe80::1%eth0", "fec0::1", "ff02::1", "::7f00:1",
]
PUBLIC = [
    "8.8.8.8", "1.1.1.1", "93.184.216.34", "172.15.255.255", "172.32.0.0", "100.63.255.255", "100.128.0.0",
    "192.0.1.1", "192.88.98.255", "198.17.255.255", "198.20.0.0", "223.255.255.255", "::ffff:8.8.8.8",
    "2606:4700:4700::1111", "2a00:1450:4001::1", "2001:200::1", "2c0f:f248::1",
]


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_special_purpose_addresses_are_not_public(address):
    assert not is_public(address)


@pytest.mark.parametrize("address", PUBLIC)
def test_ordinary_unicast_addresses_are_public(address):
    assert is_public(address)


@pytest.mark.parametrize("block", NON_PUBLIC_IPV4 + NON_PUBLIC_IPV6, ids=str)
def test_every_listed_block_is_refused_from_its_first_to_its_last_address(block):
    assert not is_public(str(block.network_address)) and not is_public(str(block.broadcast_address))
    if block.version == 4:
        assert not is_public(f"::ffff:{block.network_address}")


def test_the_rule_is_the_table_not_the_interpreter():
    # Every address above is judged by the table alone: where this interpreter's ipaddress disagrees (192.0.0.8
    # on Python 3.11.7, say), the table wins, and it says the same on every version.
    disagreements = [a for a in NOT_PUBLIC if ipaddress.ip_address(a.split("%")[0]).is_global]
    assert all(not is_public(a) for a in disagreements)
