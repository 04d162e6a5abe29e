"""Several workers on one cache_dir (relay/cache/workers/): the fill lock per key, the ledger,
the indexes kept in step with it, the volume check, and a fill followed from another cache.
Two workers are modelled by two objects on one directory: `flock` belongs to an open file
description and SQLite to a connection, so two in one process exclude and see each other as
two processes do (the e2e tests run real worker processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from relay.cache import workers
from relay.cache.cache import Cache, FillOrder, open_cache
from relay.cache.clock import ManualClock
from relay.cache.fill import Fill
from relay.cache.key import digest
from relay.cache.store import Store
from relay.cache.workers import ledger as ledger_module
from relay.cache.workers import volume
from relay.cache.workers.follow import Backoff, Follower
from relay.cache.workers.index import LedgerIndex
from relay.cache.workers.lead import Locks
from relay.cache.workers.ledger import Ledger, Row
from relay.config import Config, Route, WorkerInfo
from relay.net.upstream import Upstream
from tests.cache.test_store import _fill

# ---- the fill lock -----------------------------------------------------------------------------


def test_a_keys_fill_lock_has_one_leader_whose_version_the_others_read(tmp_path: Path) -> None:
    """Two workers: the first takes the lock, the second cannot and reads the leader's
    version; released, the key is free and the second leads."""
    one, two = Locks(tmp_path), Locks(tmp_path)
    one.prepare()
    lead = one.lead("k" * 64, "a" * 16)
    assert lead is not None
    assert lead.previous is None
    assert two.lead("k" * 64, "b" * 16) is None
    assert two.leader("k" * 64) == "a" * 16
    assert two.held("k" * 64, "a" * 16)
    one.release(lead)
    assert not two.held("k" * 64, "a" * 16)
    assert two.leader("k" * 64) is None
    second = two.lead("k" * 64, "b" * 16)
    assert second is not None
    assert second.previous is None  # the first one cleared its version
    two.release(second)
    assert list(tmp_path.iterdir()) == []  # no lock file left


def test_a_leader_that_dies_frees_the_key_and_leaves_its_version_to_the_next(
    tmp_path: Path,
) -> None:
    """A leader whose descriptor closes without releasing (its process killed) holds
    nothing; the next leader learns the version it left, to remove its leftovers."""
    locks = Locks(tmp_path)
    locks.prepare()
    dead = locks.lead("d" * 64, "a" * 16)
    assert dead is not None
    os.close(dead.fd)  # what the kernel does when its process dies
    assert locks.leader("d" * 64) is None
    assert locks.free("d" * 64)
    nxt = locks.lead("d" * 64, "b" * 16)
    assert nxt is not None
    assert nxt.previous == "a" * 16
    locks.release(nxt)


def test_the_followers_poll_backs_off_and_starts_over_after_progress() -> None:
    backoff = Backoff(first=0.001, longest=0.008)
    assert [backoff.next() for _ in range(5)] == [0.001, 0.002, 0.004, 0.008, 0.008]
    backoff.progress()
    assert backoff.next() == 0.001


# ---- the ledger --------------------------------------------------------------------------------


def _ledgers(tmp_path: Path) -> tuple[Ledger, Ledger]:
    return Ledger(tmp_path / "ledger.sqlite", "a" * 16), Ledger(
        tmp_path / "ledger.sqlite", "b" * 16
    )


def test_what_one_worker_stores_or_removes_the_other_reads_as_changes(tmp_path: Path) -> None:
    one, two = _ledgers(tmp_path)
    assert two.changed()  # the first look
    assert not two.changed()
    one.stored(Row("k1", "aa/x.1.data", 100), reserved=0)
    one.stored(Row("k2", "bb/y.1.data", 50), reserved=0)
    assert two.changed()
    changes = two.changes(0)
    assert changes is not None
    assert [(c.key, c.stored, c.mine) for c in changes] == [
        ("k1", True, False),
        ("k2", True, False),
    ]
    # A new version replaces the old one: the old row is returned (its files go).
    old = two.stored(Row("k1", "aa/x.2.data", 120), reserved=0)
    assert old == Row("k1", "aa/x.1.data", 100)
    assert not one.removed("k1", "aa/x.1.data")  # that version is not the ledger's any more
    assert one.removed("k2", "bb/y.1.data")
    changes = one.changes(2)
    assert changes is not None
    assert [(c.key, c.data, c.stored, c.mine) for c in changes] == [
        ("k1", "aa/x.2.data", True, False),
        ("k2", "bb/y.1.data", False, True),
    ]
    assert one.totals() == (120, 0)
    one.close()
    two.close()


def test_reservations_evict_the_least_recently_used_of_every_worker(tmp_path: Path) -> None:
    """One budget: a reservation by either worker evicts the least recently used versions,
    whoever stored them, in the order hits were recorded; a reservation that cannot fit
    evicts nothing."""
    one, two = _ledgers(tmp_path)
    one.stored(Row("a", "00/a.data", 100), reserved=0)
    two.stored(Row("b", "00/b.data", 100), reserved=0)
    one.stored(Row("c", "00/c.data", 100), reserved=0)
    two.touch(["a"])  # a is now the most recently used
    fits, victims = two.reserve(150, reserved=0, limit=300, keep="x")
    assert fits
    assert [v.key for v in victims] == ["b", "c"]
    assert two.totals() == (100, 150)
    # Both workers' reservations count: the other's 150 and 200 more cannot fit in 300 even
    # with `a` evicted, so nothing is.
    fits, victims = one.reserve(200, reserved=0, limit=300, keep="y")
    assert not fits
    assert victims == []
    assert one.totals() == (100, 150)
    # A worker that is gone: its reservations are forgotten.
    one.forget_owners(["b" * 16])
    assert one.totals() == (100, 0)
    one.close()
    two.close()


def test_a_worker_too_far_behind_reloads_every_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ledger_module, "KEEP_CHANGES", 10)
    one, two = _ledgers(tmp_path)
    for n in range(1000):
        one.stored(Row(f"k{n}", f"00/{n}.data", 1), reserved=0)
    assert two.changes(0) is None  # the first ones were pruned
    rows, last = two.rows()
    assert len(rows) == 1000
    assert last == 1000
    assert two.changes(last) == []
    one.close()
    two.close()


# ---- two indexes on one ledger -----------------------------------------------------------------


def _index(tmp_path: Path, owner: str, clock: ManualClock, max_bytes: int = 1 << 20) -> LedgerIndex:
    store = Store(tmp_path)
    store.prepare()
    ledger = Ledger(tmp_path / "ledger.sqlite", owner)
    return LedgerIndex(max_bytes, lambda: 0, ledger, store, clock.monotonic)


def test_an_index_learns_what_another_worker_stored_replaced_and_removed(tmp_path: Path) -> None:
    """B's index follows A's changes at `sync`; a version A removed leaves B's index as
    foreign: B never removes its files (A does)."""
    clock = ManualClock()
    a, b = _index(tmp_path, "a" * 16, clock), _index(tmp_path, "b" * 16, clock)
    removed: list[Path] = []
    b.remove_files = lambda entry: removed.append(entry.data)
    first = _fill(a.store, "k", b"one")
    a.add(first)
    b.sync()
    seen = b.peek("k")
    assert seen is not None
    assert seen.data == first.data
    assert seen.meta.length == 3
    b.pin(seen)  # a reader in B
    second = _fill(a.store, "k", b"two!")
    assert a.add(second) is first
    b.sync()
    now = b.peek("k")
    assert now is not None
    assert now.data == second.data
    assert seen.retired
    assert seen.foreign
    assert not b.unpin(seen)  # its files are A's to remove
    a.remove("k")
    b.sync()
    assert b.peek("k") is None
    assert removed == []
    assert a.ledger.totals() == (0, 0)


def test_an_eviction_by_one_worker_removes_what_the_other_fill(tmp_path: Path) -> None:
    """B stores, A needs room: A evicts B's version in the ledger and gets it to remove (even
    though A never loaded it); B's index drops it at its next sync, without removing files."""
    clock = ManualClock()
    a = _index(tmp_path, "a" * 16, clock, max_bytes=3 * 4096 + 1)
    b = _index(tmp_path, "b" * 16, clock, max_bytes=3 * 4096 + 1)
    entry = _fill(b.store, "old", b"x" * 100)
    b.add(entry)
    fits, victims = a.reserve("new", 2 * 4096)
    assert fits
    assert [(v.key, v.data) for v in victims] == [("old", entry.data)]
    b.sync()
    assert b.peek("old") is None
    assert a.reserved == 2 * 4096
    assert a.used == 2 * 4096


def test_hits_reach_the_shared_order_after_a_second_or_before_an_eviction(tmp_path: Path) -> None:
    clock = ManualClock()
    a = _index(tmp_path, "a" * 16, clock, max_bytes=3 * 8192)
    b = _index(tmp_path, "b" * 16, clock, max_bytes=3 * 8192)
    for key in ("p", "q"):
        a.add(_fill(a.store, key, b"x" * 10))
    b.sync()
    assert b.get("p") is not None  # B reads p: q is now the least recently used
    clock.advance(ledger_module.TOUCH_SECONDS + 0.1)
    b.sync()  # writes B's hits
    _, victims = a.reserve("r", 2 * 8192)
    assert [v.key for v in victims] == ["q"]


# ---- the volume ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("f_type", "name"), [(0x6969, "nfs"), (0x65735546, "fuse"), (0xFF534D42, "cifs")]
)
def test_a_network_or_user_space_volume_is_refused(tmp_path: Path, f_type: int, name: str) -> None:
    with pytest.raises(volume.UnfitVolume, match=f"is on {name} .*must be a local file system"):
        volume.check(tmp_path, f_type=f_type)


def test_a_volume_whose_locks_do_not_exclude_another_process_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    volume.check(tmp_path)  # this machine's tmp: a local file system with real locks
    assert list(tmp_path.iterdir()) == []  # the probe is removed
    monkeypatch.setattr(volume, "_other_process_sees", lambda probe: "free")
    with pytest.raises(volume.UnfitVolume, match="was 'free' to another"):
        volume.check(tmp_path)


# ---- a fill followed from another worker ----------------------------------------------------


class _Gated:
    """The upstream: a 6-byte storable body per path, its last 3 bytes sent once `gate` is
    set; the paths asked for, in order."""

    def __init__(self, cache_control: str = "max-age=600") -> None:
        self.gate = asyncio.Event()
        self.asked: list[str] = []
        self.cache_control = cache_control

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.asked.append(request.url.path)
        gate = self.gate

        class Body(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                yield b"abc"
                await gate.wait()
                yield b"def"

        headers = {"Content-Length": "6", "ETag": '"e"', "Cache-Control": self.cache_control}
        return httpx.Response(200, headers=headers, stream=Body())


def _config(tmp_path: Path) -> Config:
    return Config(
        routes=(Route(prefix="/o/", upstream="http://up.test/"),),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 20,
        max_connections=2,
        workers=2,
    )


@contextlib.asynccontextmanager
async def _two_workers(tmp_path: Path, upstream: _Gated) -> AsyncIterator[tuple[Cache, Cache]]:
    config = _config(tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        caches = []
        for index in (0, 1):
            client = await stack.enter_async_context(
                httpx.AsyncClient(transport=httpx.MockTransport(upstream.handler))
            )
            worker = WorkerInfo(index=index, count=2, run_dir=tmp_path)
            cache = await stack.enter_async_context(
                open_cache(config, Upstream(client, config), worker=worker)
            )
            assert cache is not None
            caches.append(cache)
        yield caches[0], caches[1]


def _order(cache: Cache, path: str) -> FillOrder:
    """A miss's fill of `path` (its base key is the path itself)."""
    route = cache.config.routes[0]
    request = cache.upstream.build_request("GET", f"http://up.test{path}", [], route)
    return FillOrder(base=path, variant="", request=request, route=route)


async def _wait(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until `predicate()` (the follower polls files: no event to wait on)."""
    while not predicate():
        await asyncio.sleep(0.001)


async def _lead_and_follow(
    zero: Cache, one: Cache, path: str, *, lead_held: bool
) -> tuple[Fill, Follower]:
    """Worker 0 fills `path` (held by a client if `lead_held`), then worker 1 asks for it
    once its head is known: worker 1's fill is a follower, held by a client."""
    lead = zero.fill(_order(zero, path))
    if lead_held:
        lead.clients.hold()
    await lead.headers_ready.wait()
    follower = one.fill(_order(one, path))
    assert isinstance(follower, Follower)
    follower.clients.hold()
    return lead, follower


async def test_a_fill_is_followed_from_its_first_byte_and_ends_when_its_leader_publishes(
    tmp_path: Path,
) -> None:
    """Worker 1 asks for what worker 0 is filling: it follows (no upstream request), has the
    first bytes while the upstream holds the rest, and is complete, with the published
    record, once worker 0 published; its index then holds the object."""
    upstream = _Gated()
    async with _two_workers(tmp_path, upstream) as (zero, one):
        lead, follower = await _lead_and_follow(zero, one, "/o/f", lead_held=True)
        await asyncio.wait_for(follower.headers_ready.wait(), 10)
        assert follower.meta is not None
        assert follower.length == 6
        await asyncio.wait_for(_wait(lambda: follower.written == 3), 10)
        assert not follower.complete
        upstream.gate.set()
        await asyncio.wait_for(follower.wait_finished(), 10)
        assert follower.complete
        assert follower.failed is None
        assert follower.read_fd is not None
        assert os.pread(follower.read_fd, 6, 0) == b"abcdef"
        assert upstream.asked == ["/o/f"]  # one upstream request for both workers
        lead.clients.release()
        follower.clients.release()
        stored = one.lookup("/o/f", "")
        assert stored is not None
        # One budget: the object is counted once, its reservation gone, the same for both.
        assert zero.index.used == one.index.used
        assert one.ledger_index is not None
        assert one.ledger_index.ledger.totals() == (stored.cost, 0)


async def test_a_fill_whose_leader_gives_up_fails_its_followers(tmp_path: Path) -> None:
    """The leading fill stops before its body is whole (it is cancelled, as its process
    dying would end it): the follower fails (its readers abort), nothing is stored."""
    upstream = _Gated()
    async with _two_workers(tmp_path, upstream) as (zero, one):
        lead, follower = await _lead_and_follow(zero, one, "/o/g", lead_held=False)
        await asyncio.wait_for(_wait(lambda: follower.written == 3), 10)
        assert lead.task is not None
        lead.stop("test")
        await asyncio.wait_for(follower.wait_finished(), 10)
        assert not follower.complete
        assert follower.failed is not None
        assert "unpublished" in follower.failed
        follower.clients.release()
        assert one.lookup("/o/g", "") is None
        assert zero.lookup("/o/g", "") is None


def test_the_package_docstring_names_each_module() -> None:
    assert workers.__doc__ is not None
    for name in ("lead", "follow", "leading", "ledger", "index", "shared", "volume"):
        assert f"`{name}`" in workers.__doc__


def test_a_ledger_that_fails_leaves_the_worker_serving_from_its_own_index(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ledger that cannot be read or written (its database closed under the index): lookups go on
    from the worker's own index, a reservation finds no room, one warning is logged for many
    failures, and nothing raises."""
    clock = ManualClock()
    index = _index(tmp_path, "a" * 16, clock)
    entry = _fill(index.store, "k", b"body")
    index.add(entry)
    index.ledger._db.close()  # every SQLite call fails from now on, as on a full disk
    other = Ledger(tmp_path / "ledger.sqlite", "b" * 16)
    other.stored(Row("x", "00/x.data", 1), reserved=0)  # a change to look for
    with caplog.at_level("WARNING"):
        index.sync()
        assert index.get("k") is entry
        assert index.reserve("other", 4096) == (False, [])
        assert index.remove("k") is entry
        assert index.on_disk == 0
    warnings = [r for r in caplog.records if "the ledger failed" in r.getMessage()]
    assert len(warnings) == 1
    other.close()


async def test_a_worker_joining_learns_what_was_stored_while_it_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker 1 joins while worker 0 stores an object right after worker 1 read the ledger's
    rows: worker 1's first lookup finds it (the change is after its snapshot, and the write
    counter moved after worker 1 read it)."""
    upstream = _Gated()
    config = _config(tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=httpx.MockTransport(upstream.handler))
        )
        zero = await stack.enter_async_context(
            open_cache(
                config, Upstream(client, config), worker=WorkerInfo(count=2, run_dir=tmp_path)
            )
        )
        assert zero is not None
        assert zero.ledger_index is not None
        index = zero.ledger_index
        rows = Ledger.rows

        def rows_then_a_store(ledger: Ledger) -> tuple[list[Row], int]:
            found = rows(ledger)
            monkeypatch.setattr(Ledger, "rows", rows)
            index.add(_fill(zero.store, "late", b"late"))  # committed after the snapshot
            return found

        monkeypatch.setattr(Ledger, "rows", rows_then_a_store)
        one = await stack.enter_async_context(
            open_cache(
                config,
                Upstream(client, config),
                worker=WorkerInfo(index=1, count=2, run_dir=tmp_path),
            )
        )
        assert one is not None
        assert one.ledger_index is not None
        one.ledger_index.sync()
        assert one.index.peek("late") is not None


async def test_a_fill_whose_answer_is_not_stored_is_not_followed(tmp_path: Path) -> None:
    """The leader's answer may not be stored (`no-store`): it writes no head, and the
    follower ends with no answer once the leader is over, so its clients are relayed each on
    their own (`meta` None); nothing is stored."""
    upstream = _Gated(cache_control="no-store")
    async with _two_workers(tmp_path, upstream) as (zero, one):
        lead, follower = await _lead_and_follow(zero, one, "/o/n", lead_held=True)
        upstream.gate.set()
        await asyncio.wait_for(follower.wait_finished(), 10)
        assert follower.meta is None
        assert follower.failed is not None
        assert "stored nothing" in follower.failed
        assert follower.headers_ready.is_set()
        lead.clients.release()
        follower.clients.release()
        assert one.lookup("/o/n", "") is None


def test_a_fill_lock_released_twice_closes_its_descriptor_once(tmp_path: Path) -> None:
    """A second release (the task's own `finally`, then its done-callback) does nothing: its
    descriptor number may already belong to another file."""
    locks = Locks(tmp_path)
    locks.prepare()
    lead = locks.lead("r" * 64, "a" * 16)
    assert lead is not None
    locks.release(lead)
    other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        if other == lead.fd:  # the number was reused: a second close would close this file
            locks.release(lead)
            os.fstat(other)  # still open
        else:
            locks.release(lead)
    finally:
        os.close(other)
    assert locks.free("r" * 64)


async def test_a_fill_lock_that_cannot_be_taken_fills_on_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No lock file to be had (disk full, out of descriptors): the fill runs unled, as with
    one worker, and answers; never an OSError out of `Cache.fill` (a 500)."""
    upstream = _Gated()
    upstream.gate.set()
    async with _two_workers(tmp_path, upstream) as (zero, _one):

        def no_lock(*_: object) -> None:
            raise OSError(28, "No space left on device")

        assert zero.leading is not None
        monkeypatch.setattr(zero.leading.locks, "lead", no_lock)
        fill = zero.fill(_order(zero, "/o/nolock"))
        await asyncio.wait_for(fill.wait_finished(), 10)
        assert fill.failed is None
        assert upstream.asked == ["/o/nolock"]


async def test_a_fill_task_cancelled_before_its_first_step_releases_its_lock(
    tmp_path: Path,
) -> None:
    """A fill cancelled before its task ever ran (its `finally` never runs) still gives its
    key's lock back: the other worker can lead that key."""
    upstream = _Gated()
    async with _two_workers(tmp_path, upstream) as (zero, one):
        fill = zero.fill(_order(zero, "/o/early"))
        assert fill.task is not None
        fill.task.cancel()  # before the loop ran it once
        with contextlib.suppress(asyncio.CancelledError):
            await fill.task
        assert one.leading is not None
        assert one.leading.locks.free(digest(fill.key))
        upstream.gate.set()
        again = one.fill(_order(one, "/o/early"))
        assert not isinstance(again, Follower)  # worker 1 leads: nobody holds the key
        await asyncio.wait_for(again.wait_finished(), 10)
