"""A one-line progress bar for `relay fetch`, drawn on a text stream with carriage returns.

Stdlib only. The clock and the stream are parameters so tests drive it without a terminal
or the wall clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TextIO

#: Minimum seconds between two redraws (about 10 per second).
REDRAW_INTERVAL = 0.1
#: Time constant of the rate smoothing: older samples fade with exp(-age / RATE_TAU).
RATE_TAU = 2.0

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(n: float) -> str:
    """1536 -> "1.5 KiB"; bytes are shown without a fraction."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in _UNITS[1:]:
        n /= 1024
        if n < 1024 or unit == _UNITS[-1]:
            break
    return f"{n:.1f} {unit}"


def format_duration(seconds: float) -> str:
    """65 -> "1:05", 3725 -> "1:02:05"; for ETAs."""
    s = max(0, math.ceil(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Bytes done / total, percent, smoothed rate and ETA, redrawn at most every `interval`.

    `start()` at each response (the offset may jump back to zero on a restart), `update()`
    after each write, `clear()` before printing anything else on the stream.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        width: int = 80,
        clock: Callable[[], float] = time.monotonic,
        interval: float = REDRAW_INTERVAL,
    ) -> None:
        self._stream = stream
        self._width = max(20, width)
        self._clock = clock
        self._interval = interval
        self._total: int | None = None
        self._done = 0
        self._rate: float | None = None
        self._sample: tuple[float, int] | None = None  # (time, done) of the last rate sample
        self._last_draw: float | None = None
        self._drawn = 0  # length of the line currently on screen

    @property
    def rate(self) -> float | None:
        """Smoothed bytes per second, once two samples are in."""
        return self._rate

    def start(self, total: int | None, done: int) -> None:
        now = self._clock()
        self._total = total
        self._done = done
        self._sample = (now, done)
        self._draw(now)

    def update(self, done: int) -> None:
        self._done = done
        now = self._clock()
        if self._last_draw is None or now - self._last_draw >= self._interval:
            self._draw(now)

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r" + " " * self._drawn + "\r")
            self._stream.flush()
            self._drawn = 0

    def line(self) -> str:
        """The current bar, fitted to the width (without the leading carriage return)."""
        done, total = self._done, self._total
        rate = f"{format_size(self._rate)}/s" if self._rate is not None else "--- B/s"
        if total is None or total <= 0:
            return f"{format_size(done)}  {rate}"[: self._width - 1]
        frac = min(1.0, done / total)
        if self._rate:
            eta = format_duration((total - done) / self._rate) if done < total else "0:00"
        else:
            eta = "-:--"
        # fixed-width fields, so the bar does not jitter as the numbers change
        tail = f" {format_size(done):>9} / {format_size(total)}  {rate:>12}  ETA {eta:>5}"
        head = f"{int(frac * 100):3d}% "
        room = self._width - 1 - len(head) - len(tail) - 2
        if room >= 10:
            filled = int(frac * room)
            return f"{head}[{'#' * filled}{'.' * (room - filled)}]{tail}"
        return (head + tail.lstrip())[: self._width - 1]

    def _draw(self, now: float) -> None:
        self._sample_rate(now)
        self._last_draw = now
        text = self.line()
        pad = " " * max(0, self._drawn - len(text))
        self._stream.write("\r" + text + pad)
        self._stream.flush()
        self._drawn = len(text)

    def _sample_rate(self, now: float) -> None:
        if self._sample is None:
            self._sample = (now, self._done)
            return
        t0, d0 = self._sample
        dt = now - t0
        if dt <= 0:
            return
        instant = max(0, self._done - d0) / dt
        if self._rate is None:
            self._rate = instant
        else:  # exponential smoothing weighted by the time the sample covers
            self._rate += (1 - math.exp(-dt / RATE_TAU)) * (instant - self._rate)
        self._sample = (now, self._done)
