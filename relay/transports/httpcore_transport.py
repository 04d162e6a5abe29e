"""httpx's own transport (httpcore), kept selectable for comparison and as a fallback.

Two pools, like the aiohttp transport: one whose network backend enforces the egress policy
(resolve once, check every address, connect to the checked address), one for routes that
opted in to private addresses.
"""

from __future__ import annotations

import ssl
from types import TracebackType

import httpx

from relay.config import Config
from relay.egress import GuardedNetworkBackend
from relay.transports import ALLOW_PRIVATE, PoolStats


class HttpcoreTransport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._guarded = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify)
        # httpx does not take a network backend; the pool it builds does.
        self._guarded._pool._network_backend = GuardedNetworkBackend()
        self._open = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify)

    @classmethod
    def from_config(cls, config: Config) -> HttpcoreTransport:
        return cls(
            httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive,
                keepalive_expiry=config.keepalive_expiry,
            ),
            ssl_context=config.upstream_ssl_context(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._open if request.extensions.get(ALLOW_PRIVATE) else self._guarded
        return await transport.handle_async_request(request)

    async def __aenter__(self) -> HttpcoreTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._guarded.aclose()
        await self._open.aclose()

    def pool_stats(self) -> PoolStats:
        connections = self._guarded._pool.connections + self._open._pool.connections
        idle = sum(1 for c in connections if c.is_idle())
        return PoolStats(in_use=len(connections) - idle, idle=idle)
