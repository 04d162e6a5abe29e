"""SendWatchdog: cuts a client whose send has been blocked for send_timeout, or one that takes
less than min_send_rate while relay waits on it; never a client that waits on the upstream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from relay.proxy.send_watch import SendWatchdog


async def _watched(watchdog: SendWatchdog, body: Callable[[SendWatchdog], Awaitable[None]]) -> bool:
    """Run `body` (a coroutine function taking the watchdog) under it; True if it was cut."""
    loop = asyncio.get_running_loop()

    async def run() -> None:
        await body(watchdog)

    task = asyncio.ensure_future(run())
    watchdog.start(loop, task)
    try:
        await task
    except asyncio.CancelledError:
        return True
    finally:
        watchdog.stop()
    return False


async def test_send_watch_cuts_a_send_blocked_for_send_timeout() -> None:
    async def blocked(watchdog: SendWatchdog) -> None:
        watchdog.sending_since = asyncio.get_running_loop().time()
        await asyncio.sleep(10)

    watchdog = SendWatchdog(send_timeout=0.05, min_rate=0, rate_window=1.0)
    assert await _watched(watchdog, blocked)
    assert (watchdog.stalled, watchdog.too_slow) == (True, False)


async def test_send_watch_leaves_a_client_that_waits_on_the_upstream() -> None:
    """No send in progress (relay is waiting for upstream bytes): nothing to judge."""

    async def slow_upstream(watchdog: SendWatchdog) -> None:
        await asyncio.sleep(0.2)

    watchdog = SendWatchdog(send_timeout=0.05, min_rate=1_000_000, rate_window=0.05)
    assert not await _watched(watchdog, slow_upstream)
    assert (watchdog.stalled, watchdog.too_slow) == (False, False)


@pytest.mark.parametrize(("moved", "cut"), [(10, True), (10_000_000, False)])
async def test_send_watch_judges_the_rate_only_over_time_spent_waiting_on_the_client(
    moved: int, cut: bool
) -> None:
    async def waiting_on_client(watchdog: SendWatchdog) -> None:
        loop = asyncio.get_running_loop()
        watchdog.sending_since = loop.time()
        for _ in range(20):
            await asyncio.sleep(0.02)
            watchdog.sent += moved // 20
            now = loop.time()
            watchdog.client_wait += now - watchdog.sending_since
            watchdog.sending_since = now

    watchdog = SendWatchdog(send_timeout=10.0, min_rate=1000, rate_window=0.1)
    assert await _watched(watchdog, waiting_on_client) is cut
    assert watchdog.too_slow is cut
    assert not watchdog.stalled
