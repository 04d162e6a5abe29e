"""How fast a stream moves, and what that means for the upstream read size.

A stream slower than `SLOW_RATE` (its client or its upstream is slow) gets small upstream reads:
when the client is the slow side, everything read stays in memory until the client takes it, so
each slow stream then holds little. A stream faster than `FAST_RATE` gets large reads again, so
a fast stream costs few iterations per GiB. Between the two the size stays as it is, so a stream
near one threshold does not flip at every window.

The rate is taken over windows of `WINDOW` seconds, not per chunk: the kernel takes a slow
client's data in bursts (a send buffer that fills, then opens up by hundreds of KiB at once), so
one chunk's wait says little about the client's rate.
"""

from __future__ import annotations

from collections.abc import Callable

SLOW_RATE = 32e6
"""Bytes/s: a stream slower than this reads small."""

FAST_RATE = 128e6
"""Bytes/s: a stream faster than this reads large again."""

WINDOW = 0.25
"""Seconds over which the rate is measured."""

FIRST_WINDOW = 0.03
"""Seconds of the first window: a fast stream leaves small reads early."""


class ReadPacer:
    """Tells a transport (its `READ_PACE` extension) whether to read small, from the rate."""

    __slots__ = ("_bytes", "_read_small", "_since", "_small", "_window")

    def __init__(self, read_small: Callable[[bool], None], now: float) -> None:
        self._read_small = read_small
        self._small = True
        read_small(True)
        self._since = now
        self._bytes = 0
        self._window = FIRST_WINDOW

    def sent(self, nbytes: int, now: float) -> None:
        """`nbytes` more of the body are being sent; `now` is the event loop's clock."""
        self._bytes += nbytes
        elapsed = now - self._since
        if elapsed < self._window:
            return
        rate = self._bytes / elapsed
        self._since = now
        self._bytes = 0
        self._window = WINDOW
        if self._small:
            if rate > FAST_RATE:
                self._small = False
                self._read_small(False)
        elif rate < SLOW_RATE:
            self._small = True
            self._read_small(True)
