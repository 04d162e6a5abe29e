"""The private parts of aiohttp that relay uses, in one place, checked when relay is imported.

aiohttp has no public hook for these. Each is checked here at import, so an aiohttp that moved
one fails relay's start with a clear message instead of misbehaving under load.

relay's connection protocol (`_Handler` in aiohttp_transport.py) subclasses aiohttp's
undocumented `ResponseHandler`, imported from here: it overrides the methods in `OVERRIDDEN`
(a renamed one would never be called, silently dropping the head deadline, the idle-connection
rules or the reset check) and reads `read_timeout` from `set_response_params`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector

from relay.net.compat import IncompatibleDependency, assigned_in, defined_in_package, has_method

# ResponseHandler methods relay's protocol overrides (aiohttp calls them) or calls.
OVERRIDDEN = (
    "connection_made",
    "set_response_params",
    "data_received",
    "feed_data",
    "resume_reading",
    "start_timeout",
    "connection_lost",
    "is_connected",
)
CALLED = ("is_eof", "set_exception", "_drop_timeout")


class AiohttpIncompatible(IncompatibleDependency):
    owner = "aiohttp's "
    installed = f"aiohttp {aiohttp.__version__}"


_require = AiohttpIncompatible.require


def check() -> None:
    """Every private part below is where relay expects it (run at import)."""
    for name in ("_factory", "_conns", "_acquired"):
        _require(assigned_in(BaseConnector, "__init__", name), f"BaseConnector.{name}")
    for name in OVERRIDDEN + CALLED:
        _require(defined_in_package(ResponseHandler, name, "aiohttp"), f"ResponseHandler.{name}")
    _require(
        "read_timeout" in inspect.signature(ResponseHandler.set_response_params).parameters,
        "ResponseHandler.set_response_params(read_timeout=)",
    )
    _require(
        isinstance(getattr(ResponseHandler, "closed", None), property), "ResponseHandler.closed"
    )
    _require(has_method(ResponseHandler, "_drop_timeout"), "ResponseHandler._drop_timeout")
    # Read by the test harness to prove that memory bounds measure something.
    _require(assigned_in(aiohttp.StreamReader, "__init__", "_size"), "StreamReader._size")


check()


def set_protocol_factory(connector: BaseConnector, factory: Callable[[], ResponseHandler]) -> None:
    """Make `connector` build its connections' protocol with `factory`; every aiohttp 3
    connector makes them with `_factory`."""
    connector._factory = factory  # type: ignore[assignment]


def idle_connections(connector: BaseConnector) -> int:
    """Connections kept alive in the connector's pool."""
    return sum(len(conns) for conns in connector._conns.values())


def acquired_connections(connector: BaseConnector) -> int:
    """Connections the connector counts as checked out."""
    return len(connector._acquired)


def stop_read_timer(protocol: ResponseHandler) -> None:
    """Cancel the protocol's pending `sock_read` timer, if any."""
    protocol._drop_timeout()


def buffered_bytes(reader: aiohttp.StreamReader) -> int:
    """Body bytes received and not yet read from `reader` (tests: memory bounds)."""
    size: int = reader._size
    return size


__all__ = [
    "OVERRIDDEN",
    "AiohttpIncompatible",
    "ResponseHandler",
    "acquired_connections",
    "buffered_bytes",
    "check",
    "idle_connections",
    "set_protocol_factory",
    "stop_read_timer",
]
