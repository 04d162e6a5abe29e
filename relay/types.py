"""Type aliases shared across relay."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

RawHeaders = list[tuple[bytes, bytes]]

ZERO_COPY_SEND = "http.response.zerocopysend"
"""The ASGI Zero Copy Send extension: its scope["extensions"] key and its message type."""

# ---- relay's own ASGI scope keys and messages (each defined here only) ----------------------

RESET_KEY = "relay.reset_connection"
"""Scope key of a callable, set by relay's server protocol, that aborts the client connection
with a TCP reset: what is still queued for a client being cut is dropped, not delivered."""

REQUEST_ID_KEY = "relay.request_id"
"""Scope key of the request id: the client's X-Request-ID when sane, else a new one."""

EXCHANGE_KEY = "relay.proxy.exchange"
"""Scope key of the request's `relay.proxy.exchange.Exchange` record."""

WAIT_FOR_CLIENT: Message = {"type": "http.response.body", "body": b"", "more_body": True}
"""An empty body message: sent after each chunk, it returns once the server's transport has
drained (a constant, so a streaming loop allocates no second message per chunk)."""
