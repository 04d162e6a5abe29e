"""relay's upstream HTTP transport behind httpx's one seam, `handle_async_request`.

relay keeps httpx's API (`AsyncClient`, `aiter_raw`, respx and `MockTransport` in tests) and
moves the bytes with aiohttp (`aiohttp_transport.py`; measured in bench/: ~3.5x the bytes per
CPU-second of httpx's own httpcore transport, which relay used to offer as well). The
transport also reports its pool, so tests can prove that no connection is left checked out
after aborted downloads.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

import httpx

from relay.config import Config

# The extension keys relay and its transport exchange; no other `relay.*` extension exists.

# Request extension set by relay for routes that opted in to private addresses. The transport
# honours it (a second pool, without the egress guard).
ALLOW_PRIVATE = "relay.allow_private"

# Request extension the transport sets when the request had to wait for a free upstream
# connection (the pool was full): the seconds it waited, set also when the wait ended in a pool
# timeout. Absent when a connection was free at once. Read into the access log and the
# relay_upstream_pool_wait_seconds histogram.
POOL_WAIT = "relay.pool_wait"

# Response extension the transport sets: a callable taking `True` for small socket reads (a
# slow stream: less held in memory) and `False` for large ones (a fast stream: fewer iterations
# per GiB). relay/proxy/pacing.py decides which. A response without it (a test's
# `MockTransport`) is simply not paced.
READ_PACE = "relay.read_pace"


class PoolStats(NamedTuple):
    in_use: int
    """Connections checked out: serving a response that has not been closed yet."""
    idle: int
    """Connections kept alive for reuse."""


@runtime_checkable
class PooledTransport(Protocol):
    def pool_stats(self) -> PoolStats: ...


def make_transport(config: Config) -> httpx.AsyncBaseTransport:
    # Imported here: the transport module imports this one's extension keys.
    from relay.net.transports.aiohttp_transport import AiohttpTransport

    return AiohttpTransport.from_config(config)


__all__ = [
    "ALLOW_PRIVATE",
    "POOL_WAIT",
    "READ_PACE",
    "PoolStats",
    "PooledTransport",
    "make_transport",
]
