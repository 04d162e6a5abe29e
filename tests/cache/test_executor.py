"""relay.cache.executor: the cache's threads, and jobs on one object's files kept in order;
relay.cache.integrity's checks on them (one per object, a mismatch dropped and counted)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

from relay.cache.cache import Cache
from relay.cache.executor import THREAD_PREFIX, DiskExecutor, Ordered, on_cache_thread
from relay.cache.index import Entry, Index
from relay.cache.integrity import Pace, sha256_of_files
from relay.cache.store import Meta, Store
from relay.config import Config
from relay.net.upstream import Upstream


@pytest.fixture
async def executor() -> AsyncIterator[DiskExecutor]:
    pool = DiskExecutor(4)
    yield pool
    await asyncio.to_thread(pool.shutdown)


async def test_jobs_run_on_the_cache_threads(executor: DiskExecutor) -> None:
    name = await executor.run(lambda: threading.current_thread().name)
    assert name.startswith(THREAD_PREFIX)
    assert await executor.run(on_cache_thread)
    assert not on_cache_thread()


async def test_jobs_on_one_key_run_in_the_order_asked(executor: DiskExecutor) -> None:
    """A job asked for after another on the same key waits for it, even when the first is
    slow; a job on another key does not wait."""
    ordered = Ordered(executor)
    gate = threading.Event()
    ran: list[str] = []

    def slow() -> None:
        gate.wait(10)
        ran.append("slow a")

    ordered.submit(["a"], slow)
    after = ordered.submit(["a"], ran.append, "then a")
    other = ordered.submit(["b"], ran.append, "b")
    await other
    assert ran == ["b"]
    gate.set()
    await after
    assert ran == ["b", "slow a", "then a"]
    await ordered.drain()
    assert ordered.pending == 0


async def test_one_batch_per_loop_iteration_after_earlier_jobs(executor: DiskExecutor) -> None:
    """Items added in one loop iteration are one job, run after the jobs asked for on their
    keys before; a later job on one of those keys runs after the batch."""
    ordered = Ordered(executor)
    started, gate = threading.Event(), threading.Event()
    calls: list[Any] = []

    def first() -> None:
        started.set()
        gate.wait(10)
        calls.append("x first")

    ordered.submit(["x"], first)
    for key in ("x", "y", "z"):
        ordered.add(calls.append, key, key)
    later = ordered.submit(["y"], calls.append, "later y")
    await asyncio.to_thread(started.wait, 10)
    gate.set()
    await later
    # The batch ran after x's first job had ended, and y's later job after the batch.
    assert calls == ["x first", ["x", "y", "z"], "later y"]
    await ordered.drain()


async def test_sha256_of_files_paced_and_lifted(executor: DiskExecutor, tmp_path: Path) -> None:
    """A paced hash waits between blocks; lifted, it runs on at once."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * (3 * 1024 * 1024))
    pace = Pace(1.0)  # one byte per second: it would take weeks
    hashing = asyncio.create_task(sha256_of_files([path], executor, pace))
    while pace.bytes == 0:
        await asyncio.sleep(0.01)
    assert not hashing.done()
    pace.lift()
    assert await hashing == hashlib.sha256(path.read_bytes()).hexdigest()
    assert pace.bytes == 3 * 1024 * 1024


# ---- the Verifier on a Cache ----------------------------------------------------------------


def _stored(cache: Cache, key: str, body: bytes, sha256: str) -> Entry:
    store = cache.store
    partial = store.partial_path(key)
    fd = store.open_partial(partial)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    meta = Meta(
        key=key,
        url="http://up.test/" + key,
        headers=[],
        length=len(body),
        stored_at=0.0,
        initial_age=0.0,
        lifetime=60.0,
        sha256=sha256,
    )
    data = store.publish(partial, meta)
    entry = Entry(key, data, meta, store.cost(meta, data), verified=False)
    cache.index.add(entry)
    return entry


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[Cache]:
    config = Config(cache_dir=str(tmp_path), cache_max_bytes=1 << 30)
    store = Store(tmp_path)
    store.prepare()
    made = Cache(config, cast(Upstream, None), store, Index(config.cache_max_bytes))
    yield made
    await made.close()
    await asyncio.to_thread(made.executor.shutdown)


async def test_a_check_is_shared_and_verifies(cache: Cache, monkeypatch: Any) -> None:
    """Three requests needing one unverified object share one check (one hash); it matches:
    the entry is verified and stays."""
    body = b"abc" * 1000
    entry = _stored(cache, "k", body, hashlib.sha256(body).hexdigest())
    hashed: list[int] = []
    real = sha256_of_files

    async def counting(*args: Any) -> str | None:
        hashed.append(1)
        return await real(*args)

    monkeypatch.setattr("relay.cache.integrity.sha256_of_files", counting)
    results = await asyncio.gather(*(cache.verifier.entry(entry) for _ in range(3)))
    assert results == [True, True, True]
    assert hashed == [1]
    assert entry.verified
    assert cache.index.peek("k") is entry
    assert cache.stats.digest_mismatches == 0


async def test_a_mismatch_drops_counts_and_removes(cache: Cache) -> None:
    body = b"abc" * 1000
    entry = _stored(cache, "k", body, hashlib.sha256(b"other").hexdigest())
    assert not await cache.verifier.entry(entry)
    assert entry.corrupt
    assert cache.index.peek("k") is None
    assert cache.stats.digest_mismatches == 1
    await cache.disk.drain()
    assert not cache.store.data_path(entry).exists()
