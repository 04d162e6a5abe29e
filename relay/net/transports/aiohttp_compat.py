"""The private parts of aiohttp that relay uses, in one place, checked when relay is imported.

aiohttp has no public hook for these. Each is checked here at import, so an aiohttp that moved
one fails relay's start with a clear message instead of misbehaving under load.
"""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector

from relay.net.compat import IncompatibleDependency, assigned_in, has_method


class AiohttpIncompatible(IncompatibleDependency):
    pass


def _require(present: bool, what: str) -> None:
    if not present:
        raise AiohttpIncompatible(
            f"relay needs aiohttp's {what}, which aiohttp {aiohttp.__version__} does not have; "
            "install an aiohttp 3 version relay supports (see pyproject.toml)"
        )


def check() -> None:
    """Every private part below is where relay expects it (run at import)."""
    for name in ("_factory", "_conns", "_acquired"):
        _require(assigned_in(BaseConnector, "__init__", name), f"BaseConnector.{name}")
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
