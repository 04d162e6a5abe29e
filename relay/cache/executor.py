"""The cache's own threads, and the order of the jobs on one object's files.

Every blocking thing the cache does to its files runs on `DiskExecutor`'s threads, never on the
event loop and never on the default executor (which the rest of relay shares): a fill's chunk
(its `pwrite` and the running SHA-256, one job per chunk), publishing, the reads of answers not
sent zero-copy, metadata rewrites after a 304 (every slice of an object in one job), removing
objects' files (batched: one job for what one loop iteration dropped), and hashing stored
objects (one job per `HASH_BLOCK`, so a long hash never holds a thread for long and reads queue
behind at most one of its blocks).

Threads: `THREADS`, at least 8 and up to the CPU count + 4 (at most 32): the default
executor's sizing for I/O-bound work, with a floor so a few fsyncs in flight (tens of ms each on
some disks) never leave a hit's read waiting for a thread. Each fill has at most one job in
flight, so does each answer's pump; hashing stored objects takes at most `VERIFY_THREADS` of
them (`relay.cache.integrity`), the background verification one.

`Ordered` keeps the jobs on one object's files (publish, metadata rewrite, removal) in the
order they were submitted: a removal queued before a fill of the same key publishes runs first,
and a metadata rewrite never lands after a later version's publish.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

THREADS = max(8, min(32, (os.cpu_count() or 1) + 4))
#: Threads hashing stored objects at once (answers waiting on a verification; the background
#: verification is one of them): the rest are left to reads, writes and publishes.
VERIFY_THREADS = max(1, THREADS // 4)
#: The names of the cache's threads start with this.
THREAD_PREFIX = "relay-cache"


class DiskExecutor:
    """The cache's bounded thread pool (shut down with the cache)."""

    def __init__(self, threads: int = THREADS) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=THREAD_PREFIX)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on one of the cache's threads."""
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """`fn(*args)` on one of the cache's threads, as a future (to wait it out when the
        caller is cancelled: a thread cannot be stopped)."""
        return asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def shutdown(self) -> None:
        """Wait for the jobs in flight (blocking: run it in a thread), drop those queued."""
        self._pool.shutdown(wait=True, cancel_futures=True)


def on_cache_thread() -> bool:
    """Whether the caller runs on one of the cache's threads (for tests and assertions)."""
    return threading.current_thread().name.startswith(THREAD_PREFIX)


class Ordered:
    """Jobs on objects' files (named by the objects' keys), run on the executor in the order
    they were asked for on each key; jobs on other keys run alongside. Asking is synchronous,
    so the order is the order of the calls on the loop. `submit` makes one job; `add` puts an
    item in the open batch of a function (one job for every item added in one loop
    iteration: a purge's or an eviction run's removals). Every job is a task, tracked until
    done: `drain` waits for them (the cache's close: a removal or a rewrite asked for is
    finished, never cancelled)."""

    def __init__(self, executor: DiskExecutor) -> None:
        self._executor = executor
        self._last: dict[str, asyncio.Task[Any]] = {}
        """Key -> the last job asked for on its files, while it waits or runs."""
        self._open: dict[Callable[[list[Any]], None], _Batch] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def submit(self, keys: Iterable[str], fn: Callable[..., T], *args: Any) -> asyncio.Task[T]:
        """Run `fn(*args)` once every job asked for on `keys` before is done."""
        keys = list(dict.fromkeys(keys))
        before = {self._last[k] for k in keys if k in self._last}
        task = asyncio.get_running_loop().create_task(
            self._run(before, fn, args), name="cache disk job"
        )
        self._track(task, keys)
        return task

    def add(self, fn: Callable[[list[Any]], None], key: str, item: Any) -> None:
        """Add `item` to the batch of `fn` this loop iteration runs (after the jobs asked for
        on `key` before)."""
        batch = self._open.get(fn)
        if batch is None:
            batch = self._open[fn] = _Batch()
            task = asyncio.get_running_loop().create_task(
                self._run_batch(fn, batch), name="cache disk batch"
            )
            batch.task = task
            self._track(task, batch.keys)
        else:
            assert batch.task is not None
            task = batch.task
        last = self._last.get(key)
        if last is not None and last is not task:
            batch.before.add(last)
        self._last[key] = task
        batch.keys.append(key)
        batch.items.append(item)

    def _track(self, task: asyncio.Task[Any], keys: list[str]) -> None:
        for key in keys:
            self._last[key] = task
        self._tasks.add(task)

        def done(finished: asyncio.Task[Any]) -> None:
            self._tasks.discard(finished)
            for key in keys:
                if self._last.get(key) is finished:
                    del self._last[key]

        task.add_done_callback(done)

    async def _run(self, before: set[asyncio.Task[Any]], fn: Callable[..., T], args: Any) -> T:
        if before:
            await asyncio.wait(before)
        return await self._executor.run(fn, *args)

    async def _run_batch(self, fn: Callable[[list[Any]], None], batch: _Batch) -> None:
        if self._open.get(fn) is batch:
            del self._open[fn]  # closed: what is added from now on is the next batch's
        if batch.before:
            await asyncio.wait(batch.before)
        await self._executor.run(fn, batch.items)

    @property
    def pending(self) -> int:
        """Jobs asked for and not done."""
        return len(self._tasks)

    async def drain(self) -> None:
        while self._tasks:
            await asyncio.wait(set(self._tasks))


class _Batch:
    __slots__ = ("before", "items", "keys", "task")

    def __init__(self) -> None:
        self.before: set[asyncio.Task[Any]] = set()
        self.items: list[Any] = []
        self.keys: list[str] = []
        self.task: asyncio.Task[None] | None = None
