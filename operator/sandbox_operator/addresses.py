"""The address ranges task pods may never reach directly: the cluster's own, private, loopback,
link-local (cloud metadata) and NAT64 ranges, plus the cluster ranges the operator is told of.

The `internet` policy allows everything outside them; an `allowList` entry inside one is
refused, and one that contains one gets it as an exception. The inference endpoint and DNS are
reached through their own rules (LLMSANDBOX_INFERENCE_EGRESS), never through these.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

EXCLUDED_IPV4 = [
    "0.0.0.0/8",  # "this network": some stacks route it to the host itself
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",  # carrier-grade NAT, also used for pod and service ranges
    "127.0.0.0/8",
    "169.254.0.0/16",  # link-local: the metadata service of AWS, GCP, Azure, OpenStack
    "192.0.0.0/24",  # IETF protocol assignments (Oracle Cloud's legacy metadata 192.0.0.192)
    "168.63.129.16/32",  # Azure's wire server (DHCP, DNS, VM agent), public but host-local
]
EXCLUDED_IPV6 = [
    "::1/128",
    "::ffff:0:0/96",  # IPv4-mapped: IPv4 ranges above, written as IPv6
    "64:ff9b::/96",  # NAT64 well-known prefix: any IPv4 address, private ones included
    "64:ff9b:1::/48",  # NAT64 local-use prefix
    "fc00::/7",  # unique local (AWS's IPv6 metadata fd00:ec2::254 among them)
    "fe80::/10",
]


def excluded_networks(extra: Iterable[str] = ()) -> list[Network]:
    """The built-in ranges, then those of `extra` (canonical CIDRs) not already covered."""
    networks: list[Network] = [ipaddress.ip_network(c) for c in EXCLUDED_IPV4 + EXCLUDED_IPV6]
    for cidr in extra:
        network = ipaddress.ip_network(cidr)
        if not any(_within(network, known) for known in networks):
            networks.append(network)
    return networks


def _within(inner: Network, outer: Network) -> bool:
    return inner.version == outer.version and inner.subnet_of(outer)  # type: ignore[arg-type]


def excluded_by_family(extra: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """The excluded ranges as CIDR strings, IPv4 and IPv6 apart (for ipBlock.except)."""
    networks = excluded_networks(extra)
    return (
        [str(n) for n in networks if n.version == 4],
        [str(n) for n in networks if n.version == 6],
    )


def containing_exclusion(network: Network, extra: Iterable[str] = ()) -> Network | None:
    """The excluded range that `network` lies inside, if any."""
    return next((ex for ex in excluded_networks(extra) if _within(network, ex)), None)


def exclusions_inside(network: Network, extra: Iterable[str] = ()) -> list[str]:
    """The excluded ranges that lie inside `network` (it must not reach them)."""
    return [str(ex) for ex in excluded_networks(extra) if ex != network and _within(ex, network)]
