"""Egress policy: which addresses relay may connect to.

By default a route reaches only globally routable addresses. Every address a name resolves
to is checked (one bad address refuses the name: an attacker controlling DNS could otherwise
make relay pick it), embedded IPv4 addresses are unwrapped (IPv4-mapped, NAT64, 6to4,
Teredo), and relay connects to exactly the addresses it checked, so a second DNS answer
cannot switch it (DNS rebinding). The hostname still goes in Host and TLS SNI.

The checks run where the connection is made: in an aiohttp resolver (aiohttp connects to what
the resolver returned; it does not resolve IP literals, so the transport checks those first,
with `check_literal`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from relay.net.addresses import check_addresses


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
