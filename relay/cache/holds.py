"""Who a fill serves: the clients' responses that hold it and the readers attached to its body.

A fill belongs to the cache, not to a client: a client's response holds it from when it takes
it until the response's own `finally` (`Holds`), and attaches while it reads the body. A fill
with neither (`Clients.any` false) is background work, which the cache bounds and may stop
(`relay.cache.cache`); when its last client leaves is what its idle timeout counts from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol, TypeVar

from relay.cache.clock import Clock


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


class Held(Protocol):
    """What a response holds: a fill (`relay.cache.fill.Fill`)."""

    clients: Clients
    stopping: str | None
    task: asyncio.Task[None] | None


H = TypeVar("H", bound=Held)


class Holds:
    """The fills one client's response uses (waits on or reads), each held from when the
    response takes it until `release` in the response's own `finally`: a fill a client waits
    for is not background work (the cache neither stops it nor counts it as such)."""

    __slots__ = ("_fills",)

    def __init__(self) -> None:
        self._fills: list[Held] = []

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
