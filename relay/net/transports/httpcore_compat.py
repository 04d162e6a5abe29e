"""The private parts of httpx's httpcore-backed transport that relay uses, checked at import.

httpx builds its httpcore pool itself and takes no network backend; relay reaches the pool to
give it one and to count its connections. httpcore decides that an idle HTTP/1.1 connection is
reusable from its socket alone (`is_readable`), not from bytes h11 already read past the end of
the last response; relay looks at those (h11's public `trailing_data`) through the connection.
"""

from __future__ import annotations

import httpcore
import httpx

from relay.net.compat import IncompatibleDependency, assigned_in


class HttpcoreIncompatible(IncompatibleDependency):
    installed = f"httpx {httpx.__version__} / httpcore {httpcore.__version__}"


_require = HttpcoreIncompatible.require


def check() -> None:
    """Every private part below is where relay expects it (run at import). Without
    `_network_backend` the httpcore transport's egress guard could not be installed."""
    _require(assigned_in(httpx.AsyncHTTPTransport, "__init__", "_pool"), "AsyncHTTPTransport._pool")
    _require(
        assigned_in(httpcore.AsyncHTTPConnection, "__init__", "_connection"),
        "AsyncHTTPConnection._connection",
    )
    _require(
        assigned_in(httpcore.AsyncHTTP11Connection, "__init__", "_h11_state"),
        "AsyncHTTP11Connection._h11_state",
    )
    _require(
        assigned_in(httpcore.AsyncConnectionPool, "__init__", "_network_backend"),
        "AsyncConnectionPool._network_backend",
    )


check()


def pool_of(transport: httpx.AsyncHTTPTransport) -> httpcore.AsyncConnectionPool:
    pool: httpcore.AsyncConnectionPool = transport._pool
    return pool


def set_network_backend(
    transport: httpx.AsyncHTTPTransport, backend: httpcore.AsyncNetworkBackend
) -> None:
    pool_of(transport)._network_backend = backend


def has_unread_bytes(connection: httpcore.AsyncConnectionInterface) -> bool:
    """True if an HTTP/1.1 connection holds received bytes beyond its last response."""
    inner = getattr(connection, "_connection", None)
    state = getattr(inner, "_h11_state", None)
    if state is None:
        return False
    data, _closed = state.trailing_data
    return bool(data)
