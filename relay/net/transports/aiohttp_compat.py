"""The private parts of aiohttp that relay uses, in one place, checked when relay is imported.

aiohttp has no public hook for these. Each is checked here at import, so an aiohttp that moved
one fails relay's start with a clear message instead of misbehaving under load.

relay's connection protocol (`_Handler` in aiohttp_transport.py) subclasses aiohttp's
undocumented `ResponseHandler`, imported from here: it overrides the methods in `OVERRIDDEN`
(a renamed one would never be called, silently dropping the head deadline, the idle-connection
rules or the reset check) and reads `read_timeout` from `set_response_params`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector
from aiohttp.http import HttpResponseParser

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
    # complete_first_parser replaces the parser set_response_params makes.
    _require(
        "_parser" in ResponseHandler.set_response_params.__code__.co_names,
        "ResponseHandler._parser",
    )
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


# A response head is at most this far into what the upstream sent (aiohttp's limits: 8 KiB
# lines, 128 fields); what arrived with it is kept, up to here, until the head is handed over.
_RECOVERY_LIMIT = 1024 * 1024


class _Unpaused:
    """A protocol stand-in for a throwaway parse: flow control does nothing."""

    _reading_paused = False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


class _CompleteFirstParser:
    """aiohttp's response parser, made to hand over a complete response that the upstream
    followed at once (same read) with bytes that are not a response.

    aiohttp's C parser reads on past the end of a response and raises at such bytes before
    it hands over the complete response ahead of them (a 502 for a good response). Until a
    head is handed over, what arrived is kept (a read or two, bounded); if the parser raises
    then, the end of the first response is searched for (bisection: the shortest prefix of
    what arrived that parses as one complete response or fails), and a fresh parser parses
    exactly that response. It is the same strict parser, so nothing it refuses passes. The
    bytes after it are never parsed; `recovered` tells the protocol to close the connection.
    """

    def __init__(self, protocol: ResponseHandler, parser: Any, make: Callable[..., Any]) -> None:
        self._protocol = protocol
        self._make = make
        self._parser = parser
        self._seen: list[bytes] | None = []
        self._size = 0
        self.recovered = False

    def feed_data(self, data: bytes) -> Any:
        if self.recovered:  # only the recovered response's own rest (a paused body)
            return self._parser.feed_data(b"")
        seen = self._seen
        if seen is not None and data:
            self._size += len(data)
            if self._size > _RECOVERY_LIMIT:
                seen = self._seen = None
            else:
                seen.append(data)
        try:
            result = self._parser.feed_data(data)
        except Exception:
            recovered = self._recover(b"".join(seen)) if seen else None
            if recovered is None:
                raise
            return recovered
        if result[0]:
            self._seen = None
        return result

    def _probe(self, data: bytes) -> str:
        """ "complete" (one whole response), "failed", or "partial"."""
        parser = self._make(_Unpaused(), limit=2 * _RECOVERY_LIMIT)
        try:
            messages, _, _ = parser.feed_data(data)
        except Exception:
            return "failed"
        final = [payload for message, payload in messages if message.code >= 200]
        if len(final) > 1:
            return "failed"
        return "complete" if final and final[0].is_eof() else "partial"

    def _recover(self, received: bytes) -> Any:
        low, high = 1, len(received)  # the shortest prefix that is complete or fails
        while low < high:
            middle = (low + high) // 2
            if self._probe(received[:middle]) == "partial":
                low = middle + 1
            else:
                high = middle
        if high >= len(received) or self._probe(received[:high]) != "complete":
            return None
        strict = self._make(self._protocol)
        try:
            result = strict.feed_data(received[:high])
        except Exception:
            return None
        if not result[0]:
            return None
        self._parser = strict
        self._seen = None
        self.recovered = True
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


@functools.cache
def _response_param_defaults() -> dict[str, Any]:
    """set_response_params' defaults, read once (inspect.signature costs tens of µs, and
    this runs for every request)."""
    return {
        name: p.default
        for name, p in inspect.signature(ResponseHandler.set_response_params).parameters.items()
        if name != "self"
    }


def complete_first_parser(protocol: ResponseHandler, params: dict[str, Any]) -> None:
    """Wrap the parser `protocol.set_response_params(**params)` just made (see
    `_CompleteFirstParser`); built again, for a recovery, as aiohttp builds it."""
    args = {**_response_param_defaults(), **params}

    def make(owner: Any, *, limit: int | None = None) -> Any:
        return HttpResponseParser(
            owner,
            protocol._loop,
            limit or args["read_bufsize"],
            timer=args["timer"],
            payload_exception=aiohttp.ClientPayloadError,
            response_with_body=not args["skip_payload"],
            read_until_eof=args["read_until_eof"],
            auto_decompress=args["auto_decompress"],
            max_line_size=args["max_line_size"],
            max_field_size=args["max_field_size"],
            max_headers=args["max_headers"],
        )

    protocol._parser = _CompleteFirstParser(protocol, protocol._parser, make)  # type: ignore[assignment]


def recovered_a_complete_first(protocol: ResponseHandler) -> bool:
    """Whether the protocol's last response was followed at once by bytes that are not one
    (see `_CompleteFirstParser`): its connection must not be reused."""
    parser = protocol._parser
    return isinstance(parser, _CompleteFirstParser) and parser.recovered


__all__ = [
    "OVERRIDDEN",
    "AiohttpIncompatible",
    "ResponseHandler",
    "acquired_connections",
    "buffered_bytes",
    "check",
    "complete_first_parser",
    "idle_connections",
    "recovered_a_complete_first",
    "set_protocol_factory",
    "stop_read_timer",
]
