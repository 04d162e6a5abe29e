"""Per-request observation: request id, metrics and the access record, read from the Exchange.

Plain ASGI middleware (not BaseHTTPMiddleware, which breaks streaming back-pressure). Its `send`
wrapper runs for every body chunk, so for those it does one dict lookup and one comparison;
it only acts on the response start (to add X-Request-ID and note the status). Everything else
is read once, after the request is over: the metrics, then the access record.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import secrets
import time
from collections.abc import Awaitable
from typing import Any

from relay.net.peers import is_peer_request
from relay.proxy.exchange import Exchange
from relay.server.logs import direct_json_handler, json_line
from relay.server.metrics import Metrics
from relay.types import (
    EXCHANGE_KEY,
    REQUEST_ID_KEY,
    ASGIApp,
    Message,
    RawHeaders,
    Receive,
    Scope,
    Send,
)

REQUEST_ID_HEADER = b"x-request-id"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._-]{1,128}")
_MAX_LOGGED_HEADER = 512
_MAX_LOGGED_PATH = 2048
_BODYLESS = frozenset({204, 304})

access_logger = logging.getLogger("relay.access")


def request_id_from(headers: RawHeaders) -> str:
    """The client's X-Request-ID if it is short and plain, else a new one."""
    for name, value in headers:
        if name == REQUEST_ID_HEADER:
            if _SANE_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return new_request_id()


# 32 hex digits, as a UUID's: 64 random bits drawn once per process, then a counter. Unique
# within the process and, with the random half, across replicas; uuid4() per request read
# the kernel's random source each time (one system call per request). Ids are for finding
# log lines, not secrets.
_id_prefix = ""
_id_counter = itertools.count()


def _new_id_source() -> None:
    global _id_prefix, _id_counter
    _id_prefix = secrets.token_hex(8)
    _id_counter = itertools.count(secrets.randbits(32))


_new_id_source()
os.register_at_fork(after_in_child=_new_id_source)  # a forked worker must not repeat ids


def new_request_id() -> str:
    return f"{_id_prefix}{next(_id_counter) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def request_id_of(scope: Scope) -> str | None:
    rid: str | None = scope.get(REQUEST_ID_KEY)
    return rid


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, access_log: bool = True) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = scope[EXCHANGE_KEY] = Exchange()
        request_id = scope[REQUEST_ID_KEY] = request_id_from(scope["headers"])
        if is_peer_request(scope):
            # Another worker asking (a scrape, a purge): counted where the client asked.
            await self.app(scope, receive, send)
            return
        id_header = (REQUEST_ID_HEADER, request_id.encode("ascii"))
        start: Message | None = None

        # Runs for every body chunk: a plain function handing back send's own awaitable, so
        # a chunk costs one call, one dict lookup and one comparison, and no extra coroutine.
        def send_wrapper(message: Message) -> Awaitable[None]:
            nonlocal start
            if message["type"] == "http.response.start":
                # relay's id replaces any the upstream sent: one id per exchange, end to end.
                headers = [h for h in message.get("headers", ()) if h[0].lower() != id_header[0]]
                headers.append(id_header)
                message = start = {**message, "headers": headers}
            return send(message)

        self.metrics.started(exchange)
        failure: BaseException | None = None
        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self._finish(scope, exchange, start, failure)

    def _finish(
        self,
        scope: Scope,
        exchange: Exchange,
        start: Message | None,
        failure: BaseException | None,
    ) -> None:
        duration = time.monotonic() - exchange.started
        method: str = scope["method"]
        if start is not None:
            status: int = start["status"]
        elif isinstance(failure, Exception):
            status = 500  # Starlette's ServerErrorMiddleware, outside this one, answers
        else:
            status = 0  # nothing was sent: the client left first, or the task was cancelled
        outcome = exchange.outcome
        if failure is not None and outcome == "ok":
            outcome = "cancelled" if isinstance(failure, asyncio.CancelledError) else "error"
        if exchange.upstream_status is not None or exchange.bytes_counted:
            body_bytes = exchange.bytes_sent
        else:
            # A response relay made itself (health, metrics, error line) is sent whole; count
            # what it declared, as neither the relay loop nor the cache is there to count.
            body_bytes = _declared_length(start, method) if start is not None else 0
        self.metrics.observe(
            exchange, method=method, status=status, body_bytes=body_bytes, duration=duration
        )
        if self.access_log and access_logger.isEnabledFor(logging.INFO):
            self._log(scope, exchange, status, outcome, body_bytes, duration)

    def _log(
        self,
        scope: Scope,
        exchange: Exchange,
        status: int,
        outcome: str,
        body_bytes: int,
        duration: float,
    ) -> None:
        range_header = user_agent = None
        for name, value in scope["headers"]:
            if name == b"range":
                range_header = _printable(value, _MAX_LOGGED_HEADER)
            elif name == b"user-agent":
                user_agent = _printable(value, _MAX_LOGGED_HEADER)
        raw_path: bytes = scope.get("raw_path") or scope["path"].encode("utf-8", "replace")
        # Without the query string: queries can carry signatures and tokens.
        path = _printable(raw_path.split(b"?", 1)[0], _MAX_LOGGED_PATH)
        client = scope.get("client")
        ttfb = exchange.upstream_ttfb
        pool_wait = exchange.pool_wait
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": path,
            "route": exchange.route,
            "status": status,
            "bytes": body_bytes,
            "duration_ms": round(duration * 1000, 3),
            "upstream_status": exchange.upstream_status,
            "upstream_mirror": exchange.upstream_mirror,
            "upstream_ttfb_ms": None if ttfb is None else round(ttfb * 1000, 3),
            "pool_wait_ms": None if pool_wait is None else round(pool_wait * 1000, 3),
            "range": range_header,
            "client": client[0] if client else None,
            "request_id": scope[REQUEST_ID_KEY],
            "outcome": outcome,
            "resumes": exchange.resumes,
            "cache": exchange.cache,
            "user_agent": user_agent,
        }
        message = (
            f'{fields["client"] or "-"} "{fields["method"]} {path}" {status} {body_bytes} '
            f"{fields['duration_ms']:.1f}ms {outcome} id={fields['request_id']}"
        )
        # With relay's JSON handler the only taker, the line is made and queued directly:
        # the same line as the formatter would make of the record below.
        handler = direct_json_handler(access_logger, logging.INFO)
        if handler is not None:
            handler.emit_line(json_line(time.time(), "INFO", "relay.access", message, fields))
            return
        # The record is made here and handed to the logger's handlers, as Logger.info would,
        # without looking up the caller's file and line for every request (unused, and ~10%
        # of a small request's CPU together with the generic record set-up).
        record = logging.LogRecord("relay.access", logging.INFO, "", 0, message, None, None)
        record.__dict__.update(fields)
        access_logger.handle(record)


def _declared_length(start: Message, method: str) -> int:
    status: int = start["status"]
    if method == "HEAD" or status < 200 or status in _BODYLESS:
        return 0
    for name, value in start["headers"]:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _printable(raw: bytes, limit: int) -> str:
    """Header or path bytes as log-safe text: bounded, control and non-ASCII bytes escaped."""
    text = raw[:limit].decode("ascii", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
