"""What happened to one request, filled in as it goes and read once it is over.

The access log and the metrics read the same record, so neither needs work on the per-chunk
hot path: the streaming loop only adds up bytes, and everything else is set once per request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from relay.types import EXCHANGE_KEY, Scope


@dataclass(slots=True)
class Exchange:
    started: float = field(default_factory=time.monotonic)
    route: str = "-"
    """The matched route prefix, or "-" (health, metrics, 404...)."""
    upstream_status: int | None = None
    upstream_mirror: int | None = None
    """On a route with several mirrors: the place in `upstreams` (from 1) of the mirror whose
    response answered (the one that sent its head); None otherwise."""
    upstream_ttfb: float | None = None
    """Seconds from sending the upstream request to its response headers."""
    pool_wait: float | None = None
    """Seconds spent waiting for a free upstream connection."""
    bytes_sent: int = 0
    """Body bytes relayed to the client."""
    bytes_counted: bool = False
    """`bytes_sent` counts the body as it went out (set by the cache's answers, whose bodies
    may be rewritten, cut or served from a file): the access line and the metrics take it
    rather than the declared Content-Length."""
    outcome: str = "ok"
    """ok, client_abort (client went away), client_slow (cut: read slower than
    min_send_rate), upstream_abort (upstream failed mid-body, the client transfer was
    aborted), upstream_error (5xx answered before the body), rejected."""
    resumes: int = 0
    """Transparent mid-stream resumes."""
    cache: str = "-"
    """The cache's outcome: hit, miss, stale, revalidated, expired (see
    `relay.cache.plan.Plan.outcome`), pass (relayed, not stored), or "-" (not a cached
    route)."""


def exchange_of(scope: Scope) -> Exchange:
    """The request's record; created on first use so the app also works without middleware."""
    record = scope.get(EXCHANGE_KEY)
    if record is None:
        record = scope[EXCHANGE_KEY] = Exchange()
    assert isinstance(record, Exchange)
    return record
