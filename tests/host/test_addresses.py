"""host/addresses.py: the local address in the migration network, from `ip -j addr`'s output
(the pure choice), and from a real namespace's interfaces."""

from __future__ import annotations

import json

import pytest

from host.addresses import NoAddressInNetwork, address_in, local_address_in, parse_network
from host.netns import Hosts


def link(name: str, *addresses: str, **flags) -> dict:
    infos = []
    for text in addresses:
        local, _, prefix = text.partition("/")
        infos.append({"family": "inet6" if ":" in local else "inet", "local": local, "prefixlen": int(prefix or 32),
                      **flags})
    return {"ifname": name, "addr_info": infos}


INTERFACES = [link("lo", "127.0.0.1/8", "::1/128"), link("eth0", "10.0.0.5/24", "fd00:1::5/64"),
              link("mig0", "198.19.0.2/24"), link("mig1", "198.19.0.3/24")]


@pytest.mark.parametrize("cidr, chosen", [
    ("198.19.0.0/24", "198.19.0.2"),  # the first in interface order
    ("198.19.0.3/32", "198.19.0.3"),
    ("10.0.0.0/8", "10.0.0.5"),
    ("fd00:1::/64", "fd00:1::5"),
    ("127.0.0.0/8", "127.0.0.1"),
])
def test_the_first_local_address_inside_the_network_is_chosen(cidr, chosen):
    assert address_in(parse_network(cidr), INTERFACES) == chosen


def test_no_address_in_the_network_says_which_there_are():
    with pytest.raises(NoAddressInNetwork, match=r"no address of this host is in the migration network "
                                                 r"192\.168\.0\.0/16 \(its addresses: 127\.0\.0\.1, ::1, 10\.0\.0\.5"):
        address_in(parse_network("192.168.0.0/16"), INTERFACES)
    with pytest.raises(NoAddressInNetwork, match=r"its addresses: none"):
        address_in(parse_network("192.168.0.0/16"), [])


def test_an_address_that_cannot_be_bound_yet_is_not_chosen():
    tentative = [link("mig0", "fd00:2::1/64", tentative=True), link("mig1", "fd00:2::2/64")]
    assert address_in(parse_network("fd00:2::/64"), tentative) == "fd00:2::2"


def test_odd_entries_of_ip_output_are_skipped():
    odd = [{"ifname": "x"}, {"addr_info": [{"local": 5}, {"local": "not an address"}, {}]}, link("m", "198.19.0.9/24")]
    assert address_in(parse_network("198.19.0.0/24"), odd) == "198.19.0.9"


@pytest.mark.parametrize("text, said", [
    ("198.19.0.1/24", "is not a network in CIDR notation"),  # host bits: a typo for .0/24 or /32
    ("198.19.0.0/33", "is not a network in CIDR notation"),
    ("migration", "is not a network in CIDR notation"),
    ("0.0.0.0/0", "is every address"),
])
def test_bad_networks_are_refused_with_what_to_write(text, said):
    with pytest.raises(ValueError, match=said):
        parse_network(text)


def test_the_address_is_found_in_a_namespace_of_its_own():
    with Hosts(["nodeA"], migration=["nodeA"]) as hosts:
        node = hosts["nodeA"]
        out = json.loads(hosts.run_in(node, ["ip", "-j", "addr", "show"]).stdout)
        assert address_in(parse_network("198.19.0.0/24"), out) == node.migration_address
        assert address_in(parse_network("198.18.0.0/15"), out) == node.address  # eth0 comes first
    with pytest.raises(NoAddressInNetwork):
        local_address_in(parse_network("198.19.0.0/24"))  # the root namespace has none of the range
