"""relay.cache.partial: a fill's partial file on the cache's threads; a job the fill is
cancelled from is waited out, and what it opened is closed."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.cache.executor import DiskExecutor, on_cache_thread
from relay.cache.partial import open_partial
from relay.cache.store import Store


@pytest.fixture
async def executor() -> AsyncIterator[DiskExecutor]:
    pool = DiskExecutor(2)
    yield pool
    await asyncio.to_thread(pool.shutdown)


class _SlowStore(Store):
    """Opens partial files on a thread only once released; records what it opened."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.opening = threading.Event()
        self.release = threading.Event()
        self.opened: list[int] = []
        self.threads: list[bool] = []

    def open_partial(self, path: Path) -> int:
        self.threads.append(on_cache_thread())
        self.opening.set()
        self.release.wait(10)
        fd = super().open_partial(path)
        self.opened.append(fd)
        return fd


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


async def test_a_partial_file_is_made_and_opened_on_the_cache_threads(
    executor: DiskExecutor, tmp_path: Path
) -> None:
    store = _SlowStore(tmp_path)
    store.prepare()
    store.release.set()
    path = store.partial_path("k")
    write, read = await open_partial(executor, store, path)
    try:
        assert store.threads == [True]
        os.pwrite(write, b"abc", 0)
        assert os.pread(read, 3, 0) == b"abc"
    finally:
        os.close(write)
        os.close(read)


async def test_an_open_cancelled_meanwhile_closes_what_it_opened(
    executor: DiskExecutor, tmp_path: Path
) -> None:
    """The fill is stopped while its partial file is being opened: the job runs its course,
    then both descriptors are closed before the cancellation reaches the fill."""
    store = _SlowStore(tmp_path)
    store.prepare()
    opening = asyncio.create_task(open_partial(executor, store, store.partial_path("k")))
    await asyncio.to_thread(store.opening.wait, 10)
    opening.cancel()
    for _ in range(10):  # loop iterations enough to deliver the cancellation (not a wait)
        await asyncio.sleep(0)
    assert not opening.done()  # held: the job still runs
    store.release.set()
    with pytest.raises(asyncio.CancelledError):
        await opening
    (fd,) = store.opened
    assert not _is_open(fd)
