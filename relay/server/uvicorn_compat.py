"""The parts of uvicorn's httptools protocol that relay's protocol builds on, checked at import.

relay's protocol (relay/server/run.py) subclasses uvicorn's `HttpToolsProtocol`, overrides the
methods below and reads the attributes below; uvicorn documents none of them. A uvicorn that
renamed one would silently drop relay's request-head limits (431), header and body timeouts
(408), absolute-form and framing refusals (400): an override of a method uvicorn no longer
calls is never run; and a cycle whose Content-Length count moved would mis-frame zero-copy
sends. So relay refuses to start instead, naming what is missing.
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from relay.net.compat import IncompatibleDependency, assigned_in, defined_in_package, has_method

# Methods relay's protocol overrides; uvicorn (or httptools, for the parser callbacks) calls
# them. send_400_response is what uvicorn calls when a parser callback raises.
OVERRIDDEN = (
    "connection_made",
    "connection_lost",
    "on_message_begin",
    "on_url",
    "on_header",
    "on_headers_complete",
    "on_body",
    "on_message_complete",
    "send_400_response",
)
# Protocol attributes relay reads, by the method of uvicorn's that sets them.
PROTOCOL_ATTRIBUTES = {
    "__init__": ("loop", "parser", "transport", "pipeline", "cycle"),
    "on_message_begin": ("url", "scope"),
}
# Attributes of uvicorn's per-request cycle relay reads or replaces (its transport is wrapped
# so a response's head leaves with its first body bytes; its send, for zero-copy sends, is
# replaced and its Content-Length count kept: relay/server/zerocopy.py).
CYCLE_ATTRIBUTES = (
    "transport",
    "response_started",
    "response_complete",
    "keep_alive",
    "scope",
    "flow",
    "disconnected",
    "chunked_encoding",
    "expected_content_length",
)
# The cycle hands the app `self.send` when it runs it (so a `send` set on the instance is
# the one the app gets), and its send counts a body against `expected_content_length`.
CYCLE_READS = {"run_asgi": ("send",), "send": ("expected_content_length", "chunked_encoding")}


class UvicornIncompatible(IncompatibleDependency):
    owner = "uvicorn's "
    installed = f"uvicorn {uvicorn.__version__}"


_require = UvicornIncompatible.require


def check() -> None:
    """Every method relay overrides and every attribute it reads is where relay expects it."""
    for name in OVERRIDDEN:
        _require(
            defined_in_package(HttpToolsProtocol, name, "uvicorn"), f"HttpToolsProtocol.{name}"
        )
    for method, names in PROTOCOL_ATTRIBUTES.items():
        for name in names:
            _require(assigned_in(HttpToolsProtocol, method, name), f"HttpToolsProtocol.{name}")
    for name in CYCLE_ATTRIBUTES:
        _require(
            assigned_in(RequestResponseCycle, "__init__", name), f"RequestResponseCycle.{name}"
        )
    _require(
        defined_in_package(RequestResponseCycle, "send", "uvicorn"), "RequestResponseCycle.send"
    )
    for method, names in CYCLE_READS.items():
        for name in names:
            _require(
                assigned_in(RequestResponseCycle, method, name),
                f"RequestResponseCycle.{method} using {name}",
            )
    _require(has_method(FlowControl, "drain"), "FlowControl.drain")


check()

__all__ = [
    "FlowControl",
    "HttpToolsProtocol",
    "RequestResponseCycle",
    "UvicornIncompatible",
    "check",
]
