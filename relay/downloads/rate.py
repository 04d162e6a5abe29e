"""A smoothed transfer rate: an exponentially weighted average over half-second windows."""

from __future__ import annotations

import time
from collections.abc import Callable

WINDOW = 0.5
"""Seconds of bytes summed into one sample."""
ALPHA = 0.3
"""Weight of the newest sample: about the last 3 s dominate."""


class RateMeter:
    __slots__ = ("_clock", "_rate", "_window_bytes", "_window_start")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._window_start: float | None = None
        self._window_bytes = 0
        self._rate: float | None = None

    def add(self, nbytes: int) -> None:
        now = self._clock()
        if self._window_start is None:
            self._window_start = now
        self._window_bytes += nbytes
        self._fold(now)

    def reset(self) -> None:
        self._window_start = None
        self._window_bytes = 0
        self._rate = None

    def bytes_per_second(self) -> float | None:
        """The smoothed rate; decays towards 0 while nothing arrives. None before a sample."""
        if self._window_start is not None:
            self._fold(self._clock())
        return self._rate

    def _fold(self, now: float) -> None:
        assert self._window_start is not None
        elapsed = now - self._window_start
        if elapsed < WINDOW:
            return
        sample = self._window_bytes / elapsed
        # Weighted by time, so a long silence counts as the many empty windows it spans.
        weight = 1 - (1 - ALPHA) ** (elapsed / WINDOW)
        self._rate = sample if self._rate is None else weight * sample + (1 - weight) * self._rate
        self._window_start = now
        self._window_bytes = 0
