"""httpx's own transport (httpcore), kept selectable for comparison and as a fallback."""

from __future__ import annotations

import httpx

from relay.config import Config
from relay.transports import PoolStats


class HttpcoreTransport(httpx.AsyncHTTPTransport):
    @classmethod
    def from_config(cls, config: Config) -> HttpcoreTransport:
        return cls(
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive,
                keepalive_expiry=config.keepalive_expiry,
            ),
            trust_env=False,
        )

    def pool_stats(self) -> PoolStats:
        connections = self._pool.connections
        idle = sum(1 for c in connections if c.is_idle())
        return PoolStats(in_use=len(connections) - idle, idle=idle)
