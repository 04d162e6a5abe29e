"""Cutting a client that stopped reading, or (with min_send_rate) one that reads too slowly;
and noticing one that left (`ClientWatch`).

A timer re-armed from the last send, instead of a timeout around every send: the streaming
loop pays one clock read per chunk (it stores `sending_since`, `sent` and `client_wait` here),
not a timer per chunk. The rate is judged at the end of each min_rate_window (the first one is
the grace period), and only against the client: a window counts when relay spent at least half
of it waiting for the client to take what it was sent, and the client took less than
min_send_rate over that waiting time. A slow upstream leaves relay waiting on it, not on the
client, so its clients are never cut for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from relay.errors import TransferAborted
from relay.proxy.exchange import Exchange
from relay.types import Receive

logger = logging.getLogger(__name__)


class SendWatchdog:
    """Watches one response's sends; cancels its task (setting `stalled` or `too_slow`, for
    the response to tell the cause) when the client is to be cut. `stop()` ends it."""

    __slots__ = (
        "_handle",
        "_rate_due",
        "_rate_mark",
        "_wait_mark",
        "client_wait",
        "min_rate",
        "rate_window",
        "send_timeout",
        "sending_since",
        "sent",
        "stalled",
        "too_slow",
    )

    def __init__(self, send_timeout: float, min_rate: int, rate_window: float) -> None:
        self.send_timeout = send_timeout
        self.min_rate = min_rate
        self.rate_window = rate_window
        self.sending_since: float | None = None
        """When the send in progress began; None between sends."""
        self.sent = 0
        self.client_wait = 0.0
        """Seconds spent waiting for the client to take what it was sent (min_send_rate)."""
        self.stalled = False
        self.too_slow = False
        self._rate_due = 0.0
        self._rate_mark = 0
        self._wait_mark = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> None:
        first_check = self.send_timeout
        if self.min_rate:
            self._rate_due = loop.time() + self.rate_window
            first_check = min(first_check, self.rate_window)
        self._handle = loop.call_later(first_check, self._check, loop, task)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def cut(
        self,
        task: asyncio.Task[object],
        exchange: Exchange,
        reset: Callable[[], None] | None,
        path: str,
    ) -> TransferAborted | None:
        """Called where the watched task caught a CancelledError: when this watchdog cancelled
        it, the client is cut (the cancellation undone, the exchange's outcome set, why
        logged, the connection reset) and the error to raise is returned; None otherwise."""
        if not (self.stalled or self.too_slow):
            return None
        task.uncancel()
        if self.stalled:
            exchange.outcome = "client_abort"
            logger.info(
                "client stopped reading for %.0fs, cutting the download: %s",
                self.send_timeout,
                path,
            )
            cause = "client stopped reading"
        else:
            exchange.outcome = "client_slow"
            logger.warning(
                "client read fewer than %d bytes/s over %gs, cutting the download "
                "after %d bytes: %s",
                self.min_rate,
                self.rate_window,
                self.sent,
                path,
            )
            cause = "client read too slowly"
        if reset is not None:
            reset()
        return TransferAborted(cause)

    def _check(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object]) -> None:
        since = self.sending_since
        now = loop.time()
        if since is not None and now - since >= self.send_timeout:
            self.stalled = True
            task.cancel()
            return
        delay = self.send_timeout - (now - since) if since is not None else self.send_timeout
        if self.min_rate:
            if now >= self._rate_due:
                waited = self.client_wait - self._wait_mark
                if since is not None:
                    waited += now - since
                moved = self.sent - self._rate_mark
                if waited >= self.rate_window / 2 and moved < self.min_rate * waited:
                    self.too_slow = True
                    task.cancel()
                    return
                self._rate_mark = self.sent
                self._wait_mark = self.client_wait + (now - since if since is not None else 0)
                self._rate_due = now + self.rate_window
            delay = min(delay, self._rate_due - now)
        self._handle = loop.call_later(delay, self._check, loop, task)


class ClientWatch:
    """Cancels `task` when the client disconnects while it waits on something else (a fill,
    the upstream); `gone` then tells that cancellation from any other. `stop()` ends it."""

    __slots__ = ("_future", "gone")

    def __init__(self, receive: Receive, task: asyncio.Task[object]) -> None:
        self.gone = False
        self._future = asyncio.ensure_future(self._watch(receive, task))

    async def _watch(self, receive: Receive, task: asyncio.Task[object]) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        task.cancel()

    def stop(self) -> None:
        self._future.cancel()
