"""The response that owns an upstream stream from the moment it is opened until it is closed.

Cleanup is owned here, in a `finally`, not left to a `BackgroundTask`: Starlette skips those
when streaming raises, and ASGI 2.4 servers raise on every disconnect. The upstream response is
closed on normal end, client disconnect (while waiting for the upstream or mid-body), upstream
error, timeout and cancellation.

A disconnect is noticed two ways, so both ASGI code paths are covered: a watcher awaits
`http.disconnect` on `receive` (ASGI 2.3 servers such as uvicorn silently drop sends after a
disconnect, so without it relay would read the rest of the upstream body for nobody), and an
`OSError` raised by `send` is taken as the client being gone (ASGI 2.4). The watcher starts
after a body's first chunk or `WATCH_AFTER` into the exchange, so small responses need none.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

import httpx
from starlette.responses import Response

from relay.config import Config
from relay.errors import TransferAborted, UpstreamError, error_response
from relay.http.continuation import content_length, whole_range_total
from relay.net.mirrors import pinned_sha256
from relay.net.redirects import REDIRECT_STATUSES, rewrite_location_headers
from relay.net.routing import RouteTable, Target
from relay.net.transports import POOL_WAIT, READ_PACE
from relay.net.upstream import Upstream, mirror_place
from relay.proxy.admission import StreamLimiter
from relay.proxy.exchange import Exchange, exchange_of
from relay.proxy.headers import BODYLESS_STATUSES, downstream_response_headers
from relay.proxy.pacing import ReadPacer
from relay.proxy.resuming import BodyResumer
from relay.proxy.rewrite import Preset
from relay.proxy.send_watch import SendWatchdog
from relay.types import RESET_KEY, WAIT_FOR_CLIENT, RawHeaders, Receive, Scope, Send

logger = logging.getLogger(__name__)

# Seconds into an exchange before relay starts watching for the client's disconnect if no body
# has started (a slow upstream): a client gone before that is noticed this much later, the
# upstream attempt running on meanwhile. A body longer than one chunk starts the watcher at once.
WATCH_AFTER = 0.05


class Relayed(Protocol):
    """Builds a request's relayed response; with `opened`, one relaying that upstream response
    (already open, now the response's to close) instead of sending the request."""

    def __call__(self, opened: httpx.Response | None = None) -> Response: ...


class RelayResponse(Response):
    """Relays one upstream response. Takes a slot of the stream limiter when called (or is
    handed the slot of a request already admitted: `take_slot`) and gives it back in its own
    `finally`, whatever happens in between (building the upstream request included): no path
    can keep a slot. `opened`: an upstream response someone else opened for this request (a
    cache fill whose answer the cache does not keep) and handed over: this response owns it
    from construction and closes it on every path."""

    def __init__(
        self,
        upstream: Upstream,
        method: str,
        target: Target,
        headers: list[tuple[str, str]],
        *,
        routes: RouteTable,
        limiter: StreamLimiter,
        client: str | None,
        config: Config,
        opened: httpx.Response | None = None,
        sha256: str | None = None,
        adapt: Callable[[RawHeaders], RawHeaders] | None = None,
    ) -> None:
        """`sha256`: a whole body (a 200, or a 206 of every byte) must have this digest: its
        last chunk is held until the digest is checked, and a mismatch aborts the transfer (a
        registry's blob relayed without the cache); a part of the body cannot be checked.
        `adapt`: applied to the response head's headers."""
        # Response.__init__ would render a body; this response streams one instead. Nothing of
        # Starlette reads a response it did not build but calls it (its ASGI `__call__`,
        # overridden here), so none of Response's own attributes are needed.
        self._upstream = upstream
        self._method = method
        self._target = target
        self._request_headers = headers
        self._route = target.route
        self._routes = routes
        self._limiter = limiter
        self._client = client
        self._resume_attempts = config.resume_attempts
        self._watchdog = SendWatchdog(
            config.send_timeout, config.min_send_rate, config.min_rate_window
        )
        self._response: httpx.Response | None = opened
        self._sha256 = sha256
        self._adapt = adapt
        self._preset: Preset | None = None
        self._active = True
        self._client_gone = False
        self._watcher: asyncio.Future[None] | None = None
        self._watch_with: tuple[Receive, asyncio.Task[object]] | None = None
        self._slot_held = False
        self.status_code = 0
        self._exchange = Exchange()

    def take_slot(self) -> None:
        """Be handed the slot of a request already admitted (see `TakesSlot`): a request the
        cache admitted is never refused halfway when it is relayed instead."""
        self._slot_held = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if not self._slot_held:
                refusal = self._limiter.acquire(self._client)
                if refusal is not None:
                    exchange_of(scope).outcome = "rejected"
                    await error_response(refusal)(scope, receive, send)
                    return
            try:
                if self._response is not None:
                    request = self._response.request
                else:
                    request = self._upstream.build_request(
                        self._method,
                        self._upstream.url_for(self._target),
                        self._request_headers,
                        self._route,
                    )
                await self._run(scope, receive, send, request)
            finally:
                self._limiter.release(self._client)
        finally:
            await self._close()  # a handed-over response this did not get to relay

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, request: httpx.Request
    ) -> None:
        self._exchange = exchange_of(scope)
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        # The disconnect watcher starts once a body outlasts its first chunk, or when the
        # exchange is still going WATCH_AFTER in (a slow upstream): a small response never
        # needs one, and a task per request (created, stepped, cancelled) cost ~4% of its CPU.
        self._watch_with = (receive, task)
        watching = loop.call_later(WATCH_AFTER, self._start_watcher)
        watchdog = self._watchdog
        watchdog.start(loop, task)
        try:
            await self._relay(scope, receive, send, request)
        except asyncio.CancelledError:
            cut = watchdog.cut(task, self._exchange, scope.get(RESET_KEY), request.url.path)
            if cut is not None:
                raise cut from None
            if not self._client_gone:
                raise
            task.uncancel()
        except OSError:
            # ASGI 2.4: send raises once the client is gone.
            self._client_gone = True
        except TransferAborted:
            self._exchange.outcome = "upstream_abort"
            raise
        finally:
            self._active = False
            watching.cancel()
            self._watch_with = None
            if self._watcher is not None:
                self._watcher.cancel()
            watchdog.stop()
            await self._close()
        if self._client_gone:
            self._exchange.outcome = "client_abort"
            logger.debug("client went away: %s", request.url.path)

    def _start_watcher(self) -> None:
        if self._active and self._watcher is None and self._watch_with is not None:
            self._watcher = asyncio.ensure_future(self._watch_disconnect(*self._watch_with))

    async def _watch_disconnect(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
        if self._active:
            self._client_gone = True
            task.cancel()

    async def _close(self) -> None:
        response = self._response
        if response is not None and not response.is_closed:
            # Shielded: closing must finish even while this task is being cancelled.
            await asyncio.shield(response.aclose())

    async def _relay(
        self, scope: Scope, receive: Receive, send: Send, request: httpx.Request
    ) -> None:
        exchange = self._exchange
        sent_at = time.monotonic()
        opened = self._response is not None
        try:
            if self._response is None:
                self._response = await self._upstream.open(request, self._route)
            response = self._response
            preset = self._preset = Preset.open(
                self._route, response, self._routes, self._request_headers
            )
        except UpstreamError as exc:
            exchange.outcome = "upstream_error"
            exchange.pool_wait = request.extensions.get(POOL_WAIT)
            reply = error_response(exc)
            self.status_code = reply.status_code
            await reply(scope, receive, send)
            return
        if not opened:
            exchange.upstream_ttfb = time.monotonic() - sent_at
        exchange.pool_wait = request.extensions.get(POOL_WAIT)
        status = self.status_code = exchange.upstream_status = response.status_code
        exchange.upstream_mirror = mirror_place(response)
        headers = downstream_response_headers(response.headers.raw, status)
        if status in REDIRECT_STATUSES:
            headers = rewrite_location_headers(headers, response.request.url, self._routes)
        if preset is not None:
            headers = preset.headers(headers)
        if self._adapt is not None:
            headers = self._adapt(headers)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if self._method == "HEAD" or status in BODYLESS_STATUSES:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._stream_body(response, send)

    async def _stream_body(self, response: httpx.Response, send: Send) -> None:
        rewritten = self._preset is not None and self._preset.rewrites_body
        length = None if rewritten else content_length(response.headers)
        # Made when a body first fails (from the first response, which every continuation is
        # judged against): most bodies never need one.
        resumer: BodyResumer | None = None
        sent = 0
        clock = asyncio.get_running_loop().time
        watchdog = self._watchdog
        measuring = watchdog.min_rate > 0
        # A whole body (a 200, or a 206 of every byte) named by a digest is checked before
        # its last chunk goes out; one whose identity a digest pins (`pinned_sha256`) may also
        # be continued from another mirror.
        whole = response.status_code == 200 or (
            response.status_code == 206 and whole_range_total(response.headers) is not None
        )
        pinned = None
        if length is not None and response.status_code == 200 and self._resume_attempts:
            path = response.request.url.path
            pinned = pinned_sha256(self._route, path, response.headers, self._sha256)
        expected = pinned or (self._sha256 if whole else None)
        check = Sha256Check(expected) if expected else None
        try:
            while True:
                pace = response.extensions.get(READ_PACE)
                pacer = ReadPacer(pace, clock()) if pace is not None else None
                try:
                    raw = response.aiter_raw()
                    async for chunk in self._preset.body(raw) if self._preset else raw:
                        sent += len(chunk)  # taken from the upstream (a resume's offset)
                        if check is not None:
                            chunk = check.hold(chunk)
                        watchdog.sent = sent
                        now = watchdog.sending_since = clock()
                        if pacer is not None:
                            pacer.sent(len(chunk), now)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if length is None or sent < length:
                            # Back-pressure before pulling the next chunk: the server's send
                            # waits while its transport is paused, so this returns once the
                            # client has taken what it was sent. Pulling first would hold one
                            # more chunk per slow client.
                            await send(WAIT_FOR_CLIENT)
                            if self._watcher is None:
                                self._start_watcher()
                        watchdog.sending_since = None
                        if measuring:
                            watchdog.client_wait += clock() - now
                    break
                except httpx.HTTPError as exc:
                    if resumer is None:
                        resumer = BodyResumer(
                            response,
                            self._upstream,
                            self._route,
                            0 if rewritten else self._resume_attempts,
                            self._exchange,
                            pinned=expected if check is not None else None,
                        )
                    response = self._response = await resumer.resume(response, sent, exc)
        finally:
            self._exchange.bytes_sent = sent - (check.held if check is not None else 0)
        if length is not None and length != sent:
            # Defence in depth: the transport should have raised already.
            logger.warning(
                "upstream body ended at %d of %s bytes, aborting the client transfer",
                sent,
                length,
            )
            raise TransferAborted(f"short body: {sent} of {length} bytes")
        last = b""
        if check is not None:
            last = check.release()  # raises TransferAborted on a mismatch
            self._exchange.bytes_sent = sent
        await send({"type": "http.response.body", "body": last, "more_body": False})


class Sha256Check:
    """Hashes a body as it passes and holds back its last chunk (each chunk is let go when the
    next arrives) until the whole body matched the expected sha256: a body that does not is
    never delivered complete."""

    __slots__ = ("_expected", "_hash", "_held")

    def __init__(self, expected: str) -> None:
        self._expected = expected
        self._hash = hashlib.sha256()
        self._held = b""

    def hold(self, chunk: bytes) -> bytes:
        """Take `chunk`; what may go out now (the chunk held before)."""
        self._hash.update(chunk)
        out, self._held = self._held, chunk
        return out

    @property
    def held(self) -> int:
        return len(self._held)

    def release(self) -> bytes:
        """The held last chunk, once the digest matched; TransferAborted when it did not."""
        if self._hash.hexdigest() != self._expected:
            logger.warning(
                "upstream body does not match its sha256 %s, aborting the client transfer",
                self._expected[:16],
            )
            raise TransferAborted("body does not match its digest")
        return self._held
