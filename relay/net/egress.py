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
import socket
from collections.abc import Callable, Iterable
from typing import Any

import httpcore
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from relay.net.addresses import EgressRefused, check_addresses


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
