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
import logging
import time

import httpx
from starlette.responses import Response

from relay.config import Config
from relay.errors import TransferAborted, UpstreamError, error_response
from relay.http.continuation import (
    STREAM_BACKOFF,
    Continuation,
    Next,
    Retries,
    content_length,
    retry_after,
)
from relay.http.resume import resume_request_headers
from relay.net.redirects import REDIRECT_STATUSES, rewrite_location
from relay.net.routing import RouteTable, Target
from relay.net.transports import READ_PACE
from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from relay.proxy.exchange import Exchange, exchange_of
from relay.proxy.headers import BODYLESS_STATUSES, downstream_response_headers
from relay.proxy.pacing import ReadPacer
from relay.types import Receive, Scope, Send

logger = logging.getLogger(__name__)

# An empty body message: sent after each chunk, it returns once the server's transport has
# drained (a constant, so the streaming loop allocates no second message per chunk).
_WAIT_FOR_CLIENT = {"type": "http.response.body", "body": b"", "more_body": True}

# Scope key of a callable, set by relay's server protocol, that aborts the client connection
# with a TCP reset: what is still queued for a client being cut is dropped, not delivered.
RESET_KEY = "relay.reset_connection"

# Seconds into an exchange before relay starts watching for the client's disconnect if no body
# has started (a slow upstream): a client gone before that is noticed this much later, the
# upstream attempt running on meanwhile. A body longer than one chunk starts the watcher at once.
WATCH_AFTER = 0.05


def _reset(scope: Scope) -> None:
    reset = scope.get(RESET_KEY)
    if reset is not None:
        reset()


class RelayResponse(Response):
    """Relays one upstream response. Takes a slot of the stream limiter when called and
    gives it back in its own `finally`, whatever happens in between (building the upstream
    request included): no path can keep a slot."""

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
    ) -> None:
        # Response.__init__ would render a body; this response streams one instead.
        self._upstream = upstream
        self._method = method
        self._target = target
        self._request_headers = headers
        self._route = target.route
        self._routes = routes
        self._limiter = limiter
        self._client = client
        self._send_timeout = config.send_timeout
        self._resume_attempts = config.resume_attempts
        self._min_rate = config.min_send_rate
        self._rate_window = config.min_rate_window
        self._response: httpx.Response | None = None
        self._active = True
        self._client_gone = False
        self._stalled = False
        self._too_slow = False
        self._sent = 0
        self._rate_due = 0.0
        self._rate_mark = 0
        self._client_wait = self._wait_mark = 0.0
        """Seconds spent waiting for the client to take what it was sent (min_send_rate)."""
        self._sending_since: float | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._watcher: asyncio.Future[None] | None = None
        self._watch_with: tuple[Receive, asyncio.Task[object]] | None = None
        self.status_code = 0
        self._exchange = Exchange()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self._limiter.acquire(self._client)
        if refusal is not None:
            exchange_of(scope).outcome = "rejected"
            await error_response(refusal)(scope, receive, send)
            return
        try:
            request = self._upstream.build_request(
                self._method,
                self._upstream.url_for(self._target),
                self._request_headers,
                self._route,
            )
            await self._run(scope, receive, send, request)
        finally:
            self._limiter.release(self._client)

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
        first_check = self._send_timeout
        if self._min_rate:
            self._rate_due = loop.time() + self._rate_window
            first_check = min(first_check, self._rate_window)
        self._watchdog = loop.call_later(first_check, self._check_send, loop, task)
        try:
            await self._relay(send, request)
        except asyncio.CancelledError:
            if self._stalled:
                task.uncancel()
                self._exchange.outcome = "client_abort"
                logger.info(
                    "client stopped reading for %.0fs, cutting the download: %s",
                    self._send_timeout,
                    request.url.path,
                )
                _reset(scope)
                raise TransferAborted("client stopped reading") from None
            if self._too_slow:
                task.uncancel()
                self._exchange.outcome = "client_slow"
                _reset(scope)
                logger.warning(
                    "client read fewer than %d bytes/s over %gs, cutting the download "
                    "after %d bytes: %s",
                    self._min_rate,
                    self._rate_window,
                    self._sent,
                    request.url.path,
                )
                raise TransferAborted("client read too slowly") from None
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
            if self._watchdog is not None:
                self._watchdog.cancel()
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

    def _check_send(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> None:
        """Cut a client that stopped reading (a send blocked longer than send_timeout), or,
        with min_send_rate set, one that reads too slowly.

        A timer re-armed from the last send, instead of a timeout around every send: the
        streaming loop pays one clock read per chunk, not a timer per chunk. The rate is
        judged at the end of each min_rate_window (the first one is the grace period), and
        only against the client: a window counts when relay spent at least half of it
        waiting for the client to take what it was sent, and the client took less than
        min_send_rate over that waiting time. A slow upstream leaves relay waiting on it,
        not on the client, so its clients are never cut for it.
        """
        if not self._active:
            return
        since = self._sending_since
        now = loop.time()
        if since is not None and now - since >= self._send_timeout:
            self._stalled = True
            task.cancel()
            return
        delay = self._send_timeout - (now - since) if since is not None else self._send_timeout
        if self._min_rate:
            if now >= self._rate_due:
                waited = self._client_wait - self._wait_mark
                if since is not None:
                    waited += now - since
                moved = self._sent - self._rate_mark
                if waited >= self._rate_window / 2 and moved < self._min_rate * waited:
                    self._too_slow = True
                    task.cancel()
                    return
                self._rate_mark = self._sent
                self._wait_mark = self._client_wait + (now - since if since is not None else 0)
                self._rate_due = now + self._rate_window
            delay = min(delay, self._rate_due - now)
        self._watchdog = loop.call_later(delay, self._check_send, loop, task)

    async def _close(self) -> None:
        response = self._response
        if response is not None and not response.is_closed:
            # Shielded: closing must finish even while this task is being cancelled.
            await asyncio.shield(response.aclose())

    async def _relay(self, send: Send, request: httpx.Request) -> None:
        exchange = self._exchange
        sent_at = time.monotonic()
        try:
            response = self._response = await self._upstream.open(request, self._route)
        except UpstreamError as exc:
            exchange.outcome = "upstream_error"
            exchange.pool_wait = request.extensions.get("relay.pool_wait")
            reply = error_response(exc)
            self.status_code = reply.status_code
            await send(
                {
                    "type": "http.response.start",
                    "status": reply.status_code,
                    "headers": reply.raw_headers,
                }
            )
            await send({"type": "http.response.body", "body": reply.body, "more_body": False})
            return
        exchange.upstream_ttfb = time.monotonic() - sent_at
        exchange.pool_wait = request.extensions.get("relay.pool_wait")
        status = self.status_code = exchange.upstream_status = response.status_code
        headers = downstream_response_headers(response.headers.raw, status)
        if status in REDIRECT_STATUSES:
            headers = [
                (name, self._rewrite_location(value) if name == b"location" else value)
                for name, value in headers
            ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        if request.method == "HEAD" or status in BODYLESS_STATUSES:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._stream_body(response, send)

    def _rewrite_location(self, value: bytes) -> bytes:
        assert self._response is not None
        location = value.decode("latin-1")
        rewritten = rewrite_location(location, self._response.request.url, self._routes)
        return rewritten.encode("latin-1")

    async def _stream_body(self, response: httpx.Response, send: Send) -> None:
        length = content_length(response.headers)
        # Made when a body first fails (from the first response, which every continuation is
        # judged against): most bodies never need one.
        first = response
        plan: Continuation | None = None
        retries = Retries(self._resume_attempts, STREAM_BACKOFF)
        sent = 0
        clock = asyncio.get_running_loop().time
        measuring = self._min_rate > 0
        try:
            while True:
                pace = response.extensions.get(READ_PACE)
                pacer = ReadPacer(pace, clock()) if pace is not None else None
                try:
                    async for chunk in response.aiter_raw():
                        sent += len(chunk)
                        self._sent = sent
                        now = self._sending_since = clock()
                        if pacer is not None:
                            pacer.sent(len(chunk), now)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        if length is None or sent < length:
                            # Back-pressure before pulling the next chunk: the server's send
                            # waits while its transport is paused, so this returns once the
                            # client has taken what it was sent. Pulling first would hold one
                            # more chunk per slow client.
                            await send(_WAIT_FOR_CLIENT)
                            if self._watcher is None:
                                self._start_watcher()
                        self._sending_since = None
                        if measuring:
                            self._client_wait += clock() - now
                    break
                except httpx.HTTPError as exc:
                    if plan is None and self._resume_attempts:
                        plan = Continuation.for_response(first)
                    if plan is None or not retries.fail():
                        logger.warning(
                            "upstream body failed after %d bytes, aborting the client transfer: "
                            "%s (%s)",
                            sent,
                            exc,
                            response.request.url.path,
                        )
                        raise TransferAborted(str(exc)) from exc
                    response = await self._resume(plan, response, sent, retries, str(exc))
        finally:
            self._exchange.bytes_sent = sent
        if length is not None and length != sent:
            # Defence in depth: the transport should have raised already.
            logger.warning(
                "upstream body ended at %d of %s bytes, aborting the client transfer",
                sent,
                length,
            )
            raise TransferAborted(f"short body: {sent} of {length} bytes")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _resume(
        self,
        plan: Continuation,
        failed: httpx.Response,
        sent: int,
        retries: Retries,
        cause: str,
    ) -> httpx.Response:
        """Replace a failed upstream response by one that continues exactly after `sent`.

        A resume request that cannot connect, times out or meets a transient status is one
        more failed attempt, retried while `retries` allows; any answer that is not the same
        representation's next bytes aborts the client transfer.
        """
        path = failed.request.url.path
        await failed.aclose()
        wait_at_least: float | None = None  # a transient status's Retry-After
        while True:
            logger.info(
                "upstream body failed after %d bytes (%s); resuming with %s, attempt %d of %d (%s)",
                sent,
                cause,
                plan.range_header(sent),
                retries.failures,
                self._resume_attempts,
                path,
            )
            await asyncio.sleep(retries.delay(wait_at_least))
            request = self._upstream.build_request(
                "GET",
                failed.request.url,
                resume_request_headers(plan, failed.request, sent),
                self._route,
            )
            try:
                response = self._response = await self._upstream.open(request, self._route)
            except UpstreamError as exc:
                cause = f"resume failed: {exc.reason}"
                wait_at_least = None
            else:
                verdict = plan.judge(response.status_code, response.headers, sent)
                if verdict.continues:
                    self._exchange.resumes += 1
                    return response
                cause = verdict.reason
                if verdict.next is not Next.RETRY:
                    logger.warning(
                        "cannot resume, aborting the client transfer: %s (%s)", cause, path
                    )
                    raise TransferAborted(cause)
                wait_at_least = retry_after(response.headers)
                await response.aclose()
            if not retries.fail():
                logger.warning(
                    "cannot resume after %d attempts, aborting the client transfer: %s (%s)",
                    retries.failures,
                    cause,
                    path,
                )
                raise TransferAborted(cause)
