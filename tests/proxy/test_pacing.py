"""ReadPacer: small upstream reads for slow streams, large ones for fast streams (fake clock)."""

from __future__ import annotations

from relay.proxy.pacing import FAST_RATE, FIRST_WINDOW, SLOW_RATE, WINDOW, ReadPacer


class Calls:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def __call__(self, small: bool) -> None:
        self.calls.append(small)


def feed(pacer: ReadPacer, rate: float, seconds: float, start: float, chunk: int = 65536) -> float:
    """Send at `rate` bytes/s for `seconds`, from clock `start`; returns the clock at the end."""
    now = start
    step = chunk / rate
    end = start + seconds
    while now < end:
        now += step
        pacer.sent(chunk, now)
    return now


def test_starts_small_so_a_stream_holds_little_before_its_rate_is_known() -> None:
    calls = Calls()
    ReadPacer(calls, now=0.0)
    assert calls.calls == [True]


def test_a_fast_stream_switches_to_large_reads_after_the_first_window() -> None:
    calls = Calls()
    pacer = ReadPacer(calls, now=0.0)
    feed(pacer, FAST_RATE * 4, FIRST_WINDOW * 1.5, start=0.0)
    assert calls.calls == [True, False]


def test_nothing_is_decided_inside_a_window() -> None:
    calls = Calls()
    pacer = ReadPacer(calls, now=0.0)
    pacer.sent(10**9, FIRST_WINDOW / 2)  # absurdly fast, but the window is not over
    assert calls.calls == [True]


def test_a_stream_that_slows_down_goes_back_to_small_reads() -> None:
    calls = Calls()
    pacer = ReadPacer(calls, now=0.0)
    now = feed(pacer, FAST_RATE * 4, WINDOW, start=0.0)
    now = feed(pacer, SLOW_RATE / 4, WINDOW * 3, start=now)
    assert calls.calls == [True, False, True]
    feed(pacer, FAST_RATE * 4, WINDOW * 2, start=now)
    assert calls.calls == [True, False, True, False]


def test_between_the_thresholds_the_size_stays_as_it_is() -> None:
    middle = (SLOW_RATE + FAST_RATE) / 2
    small = Calls()
    feed(ReadPacer(small, now=0.0), middle, WINDOW * 4, start=0.0)
    assert small.calls == [True]
    large = Calls()
    pacer = ReadPacer(large, now=0.0)
    now = feed(pacer, FAST_RATE * 4, WINDOW, start=0.0)
    feed(pacer, middle, WINDOW * 4, start=now)
    assert large.calls == [True, False]


def test_a_stalled_client_decides_nothing_until_it_reads_again() -> None:
    """The rate is taken when a chunk is sent; a stall holds what was last read, no more."""
    calls = Calls()
    pacer = ReadPacer(calls, now=0.0)
    now = feed(pacer, SLOW_RATE / 4, WINDOW * 2, start=0.0)
    pacer.sent(65536, now + 60.0)
    assert calls.calls == [True]
