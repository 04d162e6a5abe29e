"""The address policy: which IP addresses relay may connect to by default.

Pure functions with no network library, so configuration can use them at startup. Where the
checks run on connections: relay/net/egress.py.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# Named so the log says why; all of them are also not global.
_NAMED = (
    (ipaddress.ip_network("169.254.169.254/32"), "cloud metadata address"),
    (ipaddress.ip_network("100.100.100.200/32"), "cloud metadata address"),
    (ipaddress.ip_network("fd00:ec2::254/128"), "cloud metadata address"),
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT address"),
)


class EgressRefused(OSError):
    """The upstream resolves to an address this route may not reach."""


def refusal(ip: IPAddress) -> str | None:
    """Why relay must not connect to ip by default, or None when it may."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded: list[ipaddress.IPv4Address] = []
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        for inner in embedded:
            reason = refusal(inner)
            if reason is not None:
                return f"{reason} (embedded in {ip})"
        if embedded:
            return None  # a translation of a public IPv4 address
        if ip in _NAT64_LOCAL:
            return "local-use NAT64 address"
    for network, name in _NAMED:
        if ip.version == network.version and ip in network:
            return name
    if ip.is_unspecified:
        return "unspecified address"
    if ip.is_loopback:
        return "loopback address"
    if ip.is_link_local:
        return "link-local address"
    if ip.is_multicast:
        return "multicast address"
    if ip.is_private:
        return "private address"
    if ip.is_reserved or not ip.is_global:
        return "address that is not globally routable"
    return None


def parse_ip(host: str) -> IPAddress | None:
    """The address if host is an IP literal in standard form (brackets and zone allowed)."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def check_addresses(host: str, addresses: Iterable[str]) -> None:
    for address in addresses:
        ip = parse_ip(address)
        reason = "unparseable address" if ip is None else refusal(ip)
        if reason is not None:
            raise EgressRefused(f"{host} resolves to {address}, a {reason}")


def check_literal(host: str) -> None:
    """Refuse an IP-literal host that may not be reached; names are checked on resolution."""
    reason = _literal_refusal(host)
    if reason is not None:
        raise EgressRefused(f"{host} is a {reason}")


@functools.lru_cache(maxsize=1024)
def _literal_refusal(host: str) -> str | None:
    """Per request otherwise; hosts are the few configured upstreams and their redirects."""
    ip = parse_ip(host)
    return refusal(ip) if ip is not None else None
