"""Egress policy: which addresses relay may connect to.

By default a route reaches only globally routable addresses. Every address a name resolves
to is checked (one bad address refuses the name: an attacker controlling DNS could otherwise
make relay pick it), embedded IPv4 addresses are unwrapped (IPv4-mapped, NAT64, 6to4,
Teredo), and relay connects to exactly the addresses it checked, so a second DNS answer
cannot switch it (DNS rebinding). The hostname still goes in Host and TLS SNI.

The checks run where the connection is made: in an aiohttp resolver (aiohttp connects to what
the resolver returned, and checks IP literals itself before; relay checks those first) and in
an httpcore network backend that resolves, checks, then connects to the address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

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
    ip = parse_ip(host)
    if ip is not None:
        reason = refusal(ip)
        if reason is not None:
            raise EgressRefused(f"{host} is a {reason}")


class GuardedResolver(AbstractResolver):
    """aiohttp resolver returning only checked addresses; aiohttp connects to exactly these."""

    def __init__(
        self,
        inner: AbstractResolver | None = None,
        check: Callable[[str, Iterable[str]], None] = check_addresses,
    ) -> None:
        self._inner = inner if inner is not None else DefaultResolver()
        self._check = check

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        self._check(host, [r["host"] for r in results])
        return results

    async def close(self) -> None:
        await self._inner.close()


class GuardedNetworkBackend(httpcore.AsyncNetworkBackend):
    """httpcore backend that resolves once, checks every address, and connects to it."""

    def __init__(self, inner: httpcore.AsyncNetworkBackend | None = None) -> None:
        self._inner = inner if inner is not None else httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from exc
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        try:
            check_addresses(host, addresses)
        except EgressRefused as exc:
            raise httpcore.ConnectError(f"refused by egress policy: {exc}") from exc
        error: Exception = httpcore.ConnectError(f"no address for {host}")
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise error

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not an upstream relay connects to")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
