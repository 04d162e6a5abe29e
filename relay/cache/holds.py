"""A fill as its clients and the cache see it, apart from its fetch (`relay.cache.fill`).

A fill belongs to the cache, not to a client: a client's response holds it from when it takes
it until the response's own `finally` (`Holds`), and attaches while it reads the body
(`Clients`). A fill with neither is background work, which the cache bounds and may stop
(`SharedFill.stop`, only while `stoppable`; `relay.cache.cache` has the limits); when its last
client left is what its idle timeout counts from. An answer the fill does not store goes to
the clients `relay.cache.storable` says: one meant for one client to the first that claims it
(`claim`), an open response to the first GET that takes it (`take_response`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import TypeVar

import httpx

from relay.cache.clock import Clock
from relay.cache.overflow import HandOver
from relay.cache.store import Meta


class Clients:
    """The clients of one fill. `left` is called each time one leaves (a response releases
    it or a reader detaches), after the counts changed."""

    __slots__ = ("_clock", "_holds", "_idle_since", "_left", "coalesced", "readers")

    def __init__(self, clock: Clock, left: Callable[[], None]) -> None:
        self._clock = clock
        self._left = left
        self._holds = 0
        self.readers = 0
        """Clients reading the body as it is written."""
        self.coalesced = 0
        """Readers that joined one already reading (counted for coalescing)."""
        self._idle_since: float | None = clock.monotonic()

    def hold(self) -> None:
        """A client's response uses the fill (waits on it or reads it) until `release`."""
        self._holds += 1
        self._idle_since = None

    def release(self) -> None:
        self._holds -= 1
        self._gone()

    def attach(self) -> None:
        """A client reads the body as it is written."""
        if self.readers:
            self.coalesced += 1
        self.readers += 1
        self._idle_since = None

    def detach(self) -> None:
        self.readers -= 1
        self._gone()

    def _gone(self) -> None:
        if not self.any:
            self._idle_since = self._clock.monotonic()
        self._left()

    @property
    def holders(self) -> int:
        """How many clients' responses hold the fill (waiting on it or reading it)."""
        return self._holds

    @property
    def any(self) -> bool:
        return self._holds > 0 or self.readers > 0

    @property
    def idle_since(self) -> float:
        """When the last client left (or the fill started without one); +inf while it has
        one."""
        since = self._idle_since
        return since if since is not None else float("inf")


class SharedFill:
    """A fill as its clients and the cache see it (`relay.cache.fill.Fill` does the fetch):
    how far its body is written, who holds it, which client an answer it does not store
    goes to, and whether the cache may stop it."""

    def __init__(self, *, key: str, variant: str, clock: Clock) -> None:
        self.key = key
        self.variant = variant
        self.clients = Clients(clock, self._left)
        self.headers_ready = asyncio.Event()
        self._advance = asyncio.Event()
        self.written = 0
        self.length: int | None = None
        self.meta: Meta | None = None
        self.failed: str | None = None
        self.finished = False
        self.overflow: HandOver | None = None
        """An unsized body outgrew what may be stored: nothing is published, and its readers
        get the rest from the upstream through the hand-over, after what the partial file
        holds."""
        self.for_one = False
        """An answer meant for one client (`private`, `Set-Cookie`): see `claim`."""
        self._claimed = False
        self.read_fd: int | None = None
        """The descriptor readers of the body read from (with pread)."""
        self.open_answer: httpx.Response | None = None
        """An answer not stored that the file cannot hold from its head on: the open upstream
        response, until a client takes it (`take_response`)."""
        self._varies_on_encoding = False
        self.task: asyncio.Task[None] | None = None
        """The task running the fill (set by the cache when it starts it)."""
        self.stopping: str | None = None
        """Why the cache stopped the fill (`stop`), once it did."""
        self._started = False
        self._body_done = False

    def _clientless(self) -> None:
        """The last client left (the fill tells the cache)."""

    def _left(self) -> None:
        """A client left (`Clients`)."""
        if not self.clients.any:
            if self.finished:
                self._close_reader()
            if self.open_answer is not None:
                self._notify()  # nobody left to take it: the fill closes it
            self._clientless()
        if self.clients.readers == 0 and self.overflow is not None:
            self.overflow.reader_left()  # none left to take the rest of an overflowed body

    def claim(self, variant: str) -> bool:
        """Whether this fill's answer is also the answer of a client of encoding `variant`:
        it has one and has not failed; one varying on Accept-Encoding only for its own
        variant; one meant for one client only for the first that claims it."""
        meta = self.meta
        if meta is None or self.failed is not None:
            return False
        if meta.vary and meta.extra.get("variant") != variant:
            return False
        if self.for_one:
            if self._claimed:
                return False
            self._claimed = True
        return True

    def take_response(self, variant: str) -> httpx.Response | None:
        """The open upstream response of an answer the file cannot hold, for the first GET
        (of a variant it answers) that takes it: then that client's, to relay and to close."""
        response = self.open_answer
        if response is None or (self._varies_on_encoding and variant != self.variant):
            return None
        self.open_answer = None
        self._notify()
        return response

    def _close_reader(self) -> None:
        fd, self.read_fd = self.read_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def stoppable(self) -> bool:
        """Not over, and its body not yet complete: stopping it now publishes nothing.

        An overflowed fill offering its rest stays stoppable: the cache stops only fills with
        no client (`background`), and one with no reader left closes its rest anyway, so
        stopping it cuts nobody and frees its connection at once. Were one stopped with
        readers, none would end cleanly: the rest not taken is closed, and each reader goes
        on with `continue_at` (a judged continuation) or aborts."""
        return not self.finished and not self._body_done and self.stopping is None

    @property
    def going(self) -> bool:
        """Running, and not being stopped: a client may join it."""
        return not self.finished and self.stopping is None

    @property
    def background(self) -> bool:
        """No client waits for this fill, and the cache may still stop it."""
        return not self.clients.any and self.stoppable

    def stopped_by_cache(self) -> bool:
        """The task running the fill was cancelled (ask in its `except CancelledError`): True
        when by the cache's `stop` (the fill ends as stopped, `failed` says why), else False
        (`failed` is "cancelled"; the caller re-raises)."""
        task = asyncio.current_task()
        if self.stopping is None or (task is not None and task.uncancel() > 0):
            self.failed = "cancelled"
            return False
        self.failed = self.stopping
        return True

    def stop(self, reason: str) -> None:
        """Stop a fill no client waits for: its upstream response is closed and nothing is
        published, as after the idle timeout. The cache calls this only while `stoppable`."""
        self.stopping = reason
        if self._started and self.task is not None:
            self.task.cancel()  # a fill not started yet stops as it starts

    async def wait_beyond(self, position: int) -> None:
        """Return once more than `position` bytes are written, or the fill is over (or
        overflowed: the rest is the upstream's)."""
        while self.written <= position and not self.finished and self.overflow is None:
            await self._advance.wait()

    async def wait_finished(self) -> None:
        while not self.finished:
            await self._advance.wait()

    def _notify(self) -> None:
        event, self._advance = self._advance, asyncio.Event()
        event.set()


H = TypeVar("H", bound=SharedFill)


class Holds:
    """The fills one client's response uses (waits on or reads), each held from when the
    response takes it until `release` in the response's own `finally`: a fill a client waits
    for is not background work (the cache neither stops it nor counts it as such)."""

    __slots__ = ("_fills",)

    def __init__(self) -> None:
        self._fills: list[SharedFill] = []

    async def take(self, get: Callable[[], H]) -> H:
        """The fill `get` gives (in flight, or a new one), held. One the cache stopped just as
        this client came (nothing of it will be published) is waited out, and the one that
        follows it taken instead."""
        fill = get()
        while fill.stopping is not None and fill.task is not None and not fill.task.done():
            await asyncio.wait({fill.task})
            fill = get()
        fill.clients.hold()
        self._fills.append(fill)
        return fill

    def release(self) -> None:
        fills, self._fills = self._fills, []
        for fill in fills:
            fill.clients.release()
