"""Admission: a fixed number of relayed streams at once, refusing the rest immediately."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from relay.errors import Overloaded, RelayError, TooManyStreams


class StreamLimiter:
    """Counts streams in flight, in all and per client address. Refusing at once (503 or
    429, with Retry-After) beats queueing: a queued client holds a connection and memory
    while waiting, and CDNs retry elsewhere.

    Whoever acquires a slot releases it, with the same client, in its own `finally`.
    """

    def __init__(self, limit: int, per_client: int = 0) -> None:
        self.limit = limit
        self.per_client = per_client
        self.active = 0
        self.by_client: dict[str, int] = {}

    def acquire(self, client: str | None = None) -> RelayError | None:
        """Take a slot; or, without taking one, the refusal to answer with."""
        if self.active >= self.limit:
            return Overloaded("too many downloads in progress; retry shortly")
        if self.per_client and client is not None:
            held = self.by_client.get(client, 0)
            if held >= self.per_client:
                return TooManyStreams("too many downloads in progress from this client")
            self.by_client[client] = held + 1
        self.active += 1
        return None

    def try_acquire(self) -> bool:
        return self.acquire() is None

    def release(self, client: str | None = None) -> None:
        self.active -= 1
        if self.per_client and client is not None:
            held = self.by_client.pop(client, 0) - 1
            if held > 0:
                self.by_client[client] = held


@runtime_checkable
class TakesSlot(Protocol):
    """A response that can be handed the stream slot of a request already admitted (the
    cache or the Hub path handing its request on): it then takes none when called, and
    releases that one, with the same client, in its own `finally`."""

    def take_slot(self) -> None: ...


def hand_over(response: object) -> bool:
    """Hand the caller's stream slot to `response` if it takes one (the caller must then call
    it at once); False if not (the caller keeps and releases its slot)."""
    if isinstance(response, TakesSlot):
        response.take_slot()
        return True
    return False
