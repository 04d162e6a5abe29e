"""The cache's clock, injected: `now()` is wall time (seconds since the epoch: ages,
`stored_at`, Date arithmetic), `monotonic()` measures intervals (pass markers, idle timers).

The cache asks `Cache.clock` and nothing else for time (pacing of sends keeps the event loop's
clock: it measures the client, not the cache's semantics). Tests pass a `ManualClock` to
`create_app(config, clock=...)` and move it instead of sleeping.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, seconds since the epoch."""
        ...

    def monotonic(self) -> float:
        """A clock that never goes back, for intervals."""
        ...


class SystemClock:
    """The real time."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK: Clock = SystemClock()


class ManualClock:
    """A clock that moves only when told (`advance`): both readings move together."""

    def __init__(self, now: float = 1_800_000_000.0, monotonic: float = 1_000.0) -> None:
        self._now = now
        self._monotonic = monotonic

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds
        self._monotonic += seconds

    def __repr__(self) -> str:
        return f"ManualClock(now={self._now!r}, monotonic={self._monotonic!r})"
