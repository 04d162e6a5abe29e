"""Upstream HTTP transports behind httpx's one seam, `handle_async_request`.

relay keeps httpx's API (`AsyncClient`, `aiter_raw`, respx and `MockTransport` in tests) and
swaps what moves the bytes. Each transport also reports its pool, so tests can prove that no
connection is left checked out after aborted downloads.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple, Protocol, runtime_checkable

import httpx

from relay.config import Config

# name -> "module:attribute"; the attribute is a class with `from_config(config)`.
TRANSPORTS = {
    "aiohttp": "relay.net.transports.aiohttp_transport:AiohttpTransport",
    "httpcore": "relay.net.transports.httpcore_transport:HttpcoreTransport",
}


# The extension keys relay and its transports exchange; no other `relay.*` extension exists.

# Request extension set by relay for routes that opted in to private addresses. Both
# transports honour it (a second pool, without the egress guard).
ALLOW_PRIVATE = "relay.allow_private"

# Request extension both transports set when the request had to wait for a free upstream
# connection (the pool was full): the seconds it waited, set also when the wait ended in a pool
# timeout. Absent when a connection was free at once. Read into the access log and the
# relay_upstream_pool_wait_seconds histogram.
POOL_WAIT = "relay.pool_wait"

# Response extension a transport may set: a callable taking `True` for small socket reads (a
# slow stream: less held in memory) and `False` for large ones (a fast stream: fewer iterations
# per GiB). relay/proxy/pacing.py decides which. The aiohttp transport sets it; the httpcore
# transport does not (httpcore reads its own fixed 64 KiB at a time), and a response without it
# is simply not paced.
READ_PACE = "relay.read_pace"


class PoolStats(NamedTuple):
    in_use: int
    """Connections checked out: serving a response that has not been closed yet."""
    idle: int
    """Connections kept alive for reuse."""


@runtime_checkable
class PooledTransport(Protocol):
    def pool_stats(self) -> PoolStats: ...


class _Factory(Protocol):
    def from_config(self, config: Config) -> httpx.AsyncBaseTransport: ...


def make_transport(config: Config) -> httpx.AsyncBaseTransport:
    module_name, _, attr = TRANSPORTS[config.transport].partition(":")
    factory: _Factory = getattr(importlib.import_module(module_name), attr)
    return factory.from_config(config)


__all__ = [
    "ALLOW_PRIVATE",
    "POOL_WAIT",
    "READ_PACE",
    "TRANSPORTS",
    "PoolStats",
    "PooledTransport",
    "make_transport",
]
