"""Which of this host's addresses lies in a given network (`--migration-network CIDR`).

A node with a dedicated migration network (a second NIC, or the second veth of host/netns.py)
has one address in it; QEMU's migration stream must listen and connect there, not on
whatever address the default route picks. The choice is a pure function of `ip -j addr`'s
output (`address_in`), so it is tested on any list of interfaces; `local_address_in` runs
`ip` through the one command runner.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Sequence

from host import command

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_UNUSABLE = {"tentative", "dadfailed", "deprecated"}  # IPv6 addresses a socket cannot (or should not) bind


class NoAddressInNetwork(ValueError):
    """This host has no usable address in the network."""


def parse_network(text: str) -> Network:
    """A CIDR (198.19.0.0/24, fd00:1::/64); host bits set are refused, as a typo."""
    try:
        network = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        raise ValueError(f"{text[:60]!r} is not a network in CIDR notation (e.g. 198.19.0.0/24): {exc}") from None
    if network.prefixlen == 0:
        raise ValueError(f"{text[:60]!r} is every address: name the migration network itself")
    return network


def address_in(network: Network, interfaces: Sequence[dict]) -> str:
    """The first address (in `ip -j addr` order: by interface, then as configured) that lies in
    `network`; NoAddressInNetwork naming the addresses there are when none does."""
    seen = []
    for link in interfaces:
        for info in link.get("addr_info") or []:
            local = info.get("local")
            if not isinstance(local, str):
                continue
            try:
                address = ipaddress.ip_address(local)
            except ValueError:
                continue
            seen.append(local)
            if address.version == network.version and address in network and not _UNUSABLE & set(info):
                return str(address)
    listed = ", ".join(seen[:8]) + (", ..." if len(seen) > 8 else "") if seen else "none"
    raise NoAddressInNetwork(f"no address of this host is in the migration network {network} (its addresses: {listed})")


def local_address_in(network: Network) -> str:
    """This host's (this network namespace's) address in `network`."""
    out = command.output(["ip", "-j", "addr", "show"], timeout=10)
    try:
        interfaces = json.loads(out or "[]")
    except ValueError:
        raise NoAddressInNetwork("`ip -j addr show` did not print JSON") from None
    return address_in(network, interfaces)
