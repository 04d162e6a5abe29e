"""Stored bytes against the digests relay knows: verification, and the scrub.

An object's digest is known when its upstream announced one and the fill checked it (a Hub
LFS object's sha256, `Repr-Digest`, a slice's `Content-Digest`: `Meta.sha256`), or, for a
sliced object, the whole-object SHA-256 all its slices were checked against
(`extra["repr-sha256"]`). Such an object loaded at startup is *unverified*
(`Entry.verified` False) until its bytes are hashed again: a disk that flipped a bit, an
operator's copy or a crash must not turn into a hit with wrong bytes.

- A whole answer from byte 0 hashes while it sends (`relay.cache.delivery`) and holds its last
  chunk until the digest matches; every other answer (a range, a HEAD, a 304) first waits for
  `Verifier.entry`: one check of the object, shared by every request that needs it.
- On a mismatch the object is dropped and counted (`digest_mismatches`); an answer under way
  from it aborts its transfer (`Entry.corrupt`); a request not yet answered becomes a miss.
- At startup, `Scrub` verifies the loaded unverified objects in the background, one at a time
  at `BACKGROUND_RATE` bytes/s at most; an operator's scrub (`POST /cache/scrub`) verifies
  every object with a known digest the same way, without stopping relay.

Hashing reads `HASH_BLOCK` bytes per job on the cache's executor (`relay.cache.executor`):
answers' reads queue behind one block, never behind a whole object. Answers waiting on a
check share `VERIFY_THREADS` checks at once; the background scrub is one more, and a request
that needs the object it is checking lifts its pace.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from relay.cache.executor import VERIFY_THREADS, DiskExecutor
from relay.cache.index import Entry
from relay.cache.key import SLICE_MARK

if TYPE_CHECKING:
    from _hashlib import HASH

    from relay.cache.cache import Cache

logger = logging.getLogger(__name__)

T = TypeVar("T")

HASH_BLOCK = 1024 * 1024
#: Bytes per second the background verification (startup, scrub) hashes at most: on two
#: cores about a tenth of one core, a few minutes per 10 GiB; a 1 TB cache takes hours, during
#: which objects clients ask for are verified on demand at full speed.
BACKGROUND_RATE = 64 * 1024 * 1024


def has_known_digest(entry: Entry) -> bool:
    """Whether the stored bytes of `entry` can be checked (its own digest, or its object's)."""
    return entry.meta.sha256 is not None or "repr-sha256" in entry.meta.extra


# ---- hashing --------------------------------------------------------------------------------


class Pace:
    """How fast a check hashes: `rate` bytes/s, or as fast as it can once `lift()`ed."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._lifted = asyncio.Event()
        self.bytes = 0
        """Bytes hashed under this pace."""

    def lift(self) -> None:
        self.rate = None
        self._lifted.set()

    async def hashed(self, size: int, started: float) -> None:
        """`size` more bytes were hashed: wait as long as the rate asks (or until lifted)."""
        self.bytes += size
        rate = self.rate
        if rate is None:
            return
        delay = started + self.bytes / rate - asyncio.get_running_loop().time()
        if delay > 0:
            try:
                async with asyncio.timeout(delay):
                    await self._lifted.wait()
            except TimeoutError:
                pass


def _hash_block(fd: int, offset: int, digest: HASH) -> int:
    """Hash the next block of the file at `offset` (blocking); the bytes read (0: its end)."""
    block = os.pread(fd, HASH_BLOCK, offset)
    digest.update(block)
    return len(block)


async def sha256_of_files(
    paths: Sequence[Path], executor: DiskExecutor, pace: Pace | None = None
) -> str | None:
    """The SHA-256 of the files' bytes joined in order, one `HASH_BLOCK` per job on the
    cache's executor. None when a file is gone (evicted or purged meanwhile: nothing left to
    judge). Cancelled (relay stopping): stops at its next block."""
    digest = hashlib.sha256()
    started = asyncio.get_running_loop().time()
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            offset = 0
            while True:
                try:
                    size = await executor.run(_hash_block, fd, offset, digest)
                except OSError:
                    return None
                if not size:
                    break
                offset += size
                if pace is not None:
                    await pace.hashed(size, started)
        finally:
            os.close(fd)
    return digest.hexdigest()


# ---- checks of stored objects ---------------------------------------------------------------


class Verifier:
    """Checks stored objects against their known digest, one check per object at a time (every
    request needing it waits on that one). A check drops what it finds corrupt (counted);
    `entry`'s answer tells whether the object may be answered from."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self._running: dict[str, tuple[asyncio.Task[None], Pace]] = {}
        """Object key (a whole object's, or a sliced object's storage key) -> its check."""
        self._slots = asyncio.Semaphore(VERIFY_THREADS)

    async def entry(self, entry: Entry) -> bool:
        """Verify `entry` (a whole object, or one slice) if it is unverified: whether it may
        be answered from (False: corrupt, now dropped, or its file gone)."""
        if SLICE_MARK in entry.key:
            await self.sliced(entry.key.rpartition(SLICE_MARK)[0])
        elif not entry.verified:
            await self._check(entry.key, self._whole, entry, pace=None)
        return entry.verified and not entry.corrupt and self._cache.index.peek(entry.key) is entry

    async def sliced(self, storage: str, pace: Pace | None = None) -> None:
        """Verify the unverified slices of the object stored under `storage`: against the
        whole-object digest if every slice is stored, each against its own digest (if it has
        one) otherwise; what cannot be checked stays as it is."""
        slices = self._cache.slices
        if storage not in slices.unverified:
            return
        if any(not e.verified for e in slices.of(storage)):
            await self._check(storage, self._slices, storage, pace=pace)
        if not any(not e.verified for e in slices.of(storage)):
            slices.unverified.discard(storage)

    async def scrub(self, entry: Entry, pace: Pace) -> None:
        """Check `entry` (or its sliced object), verified or not: the scrub's step."""
        if SLICE_MARK in entry.key:
            storage = entry.key.rpartition(SLICE_MARK)[0]
            await self._check(storage, self._slices, storage, pace=pace, again=True)
        else:
            await self._check(entry.key, self._whole, entry, pace=pace, again=True)

    async def _check(
        self,
        key: str,
        run: Callable[[T, Pace, bool], Awaitable[None]],
        what: T,
        *,
        pace: Pace | None,
        again: bool = False,
    ) -> None:
        running = self._running.get(key)
        if running is not None:
            task, its_pace = running
            if pace is None:
                its_pace.lift()  # a request waits on it: at full speed from now on
            await asyncio.shield(task)
            return
        own = pace or Pace(None)
        task = asyncio.get_running_loop().create_task(
            self._guarded(run, what, own, again, background=pace is not None),
            # A background check is the scrub's, which lives as long as the cache.
            name=f"{'service: ' if pace is not None else ''}cache verify {key[:80]}",
        )
        self._running[key] = (task, own)
        cache = self._cache
        cache.tasks.add(task)

        def done(finished: asyncio.Task[None]) -> None:
            cache.tasks.discard(finished)
            if self._running.get(key, (None, own))[0] is finished:
                del self._running[key]

        task.add_done_callback(done)
        await asyncio.shield(task)

    async def _guarded(
        self,
        run: Callable[[T, Pace, bool], Awaitable[None]],
        what: T,
        pace: Pace,
        again: bool,
        *,
        background: bool,
    ) -> None:
        """Run a check (a request's under one of `VERIFY_THREADS` slots; the scrub's, one at a
        time, is bounded on its own). A disk error leaves the object unverified: no
        answer takes it, and no request fails with it."""
        try:
            if background:
                await run(what, pace, again)
                return
            async with self._slots:
                await run(what, pace, again)
        except OSError as exc:
            logger.warning("cache: cannot verify a stored object: %s", exc)

    async def _whole(self, entry: Entry, pace: Pace, again: bool) -> None:
        expected = entry.meta.sha256
        if expected is None or (entry.verified and not again):
            return
        cache = self._cache
        actual = await sha256_of_files([cache.store.data_path(entry)], cache.executor, pace)
        if cache.index.peek(entry.key) is not entry:
            return  # replaced or dropped meanwhile
        if actual is None:
            cache.drop(entry.key)  # its file is gone: nothing to answer from
            return
        if actual == expected:
            entry.verified = True
            return
        cache.corrupted([entry], actual, expected)

    async def _slices(self, storage: str, pace: Pace, again: bool) -> None:
        cache = self._cache
        slices = cache.slices.of(storage)
        todo = slices if again else [e for e in slices if not e.verified]
        if not todo:
            return
        complete = cache.slices.complete(storage)
        covered: set[str] = set()
        if complete is not None:
            expected = complete[0].meta.extra["repr-sha256"]
            paths = [cache.store.data_path(e) for e in complete]
            actual = await sha256_of_files(paths, cache.executor, pace)
            if any(cache.index.peek(e.key) is not e for e in complete) or actual is None:
                return  # changed meanwhile: judged again when complete
            if actual != expected:
                cache.corrupted(complete, actual, expected)
                cache.slices.drop_object(storage)
                return
            for e in complete:
                e.verified = True
                covered.add(e.key)
        for e in todo:
            if e.key in covered or cache.index.peek(e.key) is not e:
                continue
            if e.meta.sha256 is None:
                # No digest of its own, and the object is not complete: nothing to check it
                # against until it is (then the whole-object check runs).
                e.verified = True
                continue
            actual = await sha256_of_files([cache.store.data_path(e)], cache.executor, pace)
            if cache.index.peek(e.key) is not e:
                continue
            if actual is None:
                cache.drop(e.key)
            elif actual == e.meta.sha256:
                e.verified = True
            else:
                cache.corrupted([e], actual, e.meta.sha256)


# ---- the scrub ------------------------------------------------------------------------------


@dataclasses.dataclass(slots=True)
class ScrubProgress:
    """One scrub run, as `GET /cache/scrub` and the metrics show it."""

    reason: str
    """"startup" (the loaded unverified objects) or "admin" (every object with a digest)."""
    objects: int
    """Objects to check (a sliced object is one)."""
    checked: int = 0
    bytes_hashed: int = 0
    mismatches: int = 0
    running: bool = True

    def as_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


class Scrub:
    """The cache's background verification: one run at a time, one object at a time, paced at
    `rate` bytes/s. `last`: the run under way, or the last one."""

    def __init__(self, cache: Cache, verifier: Verifier, rate: float = BACKGROUND_RATE) -> None:
        self._cache = cache
        self._verifier = verifier
        self.rate = rate
        self.last: ScrubProgress | None = None
        self._task: asyncio.Task[None] | None = None
        self.total_checked = 0
        self.total_bytes = 0
        self.total_mismatches = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, reason: str) -> bool:
        """Start a run (False: one is under way). "startup": the unverified objects; else
        every object with a known digest."""
        if self.running:
            return False
        units: dict[str, Entry] = {}
        # Most recently used first: those are the likeliest to be asked for next.
        for entry in reversed(self._cache.index.entries()):
            if has_known_digest(entry) and (reason != "startup" or not entry.verified):
                units.setdefault(_unit(entry.key), entry)
        progress = self.last = ScrubProgress(reason, len(units))
        task = asyncio.get_running_loop().create_task(
            self._run(list(units.values()), progress), name=f"service: cache scrub ({reason})"
        )
        self._task = task
        cache = self._cache
        cache.tasks.add(task)
        task.add_done_callback(cache.tasks.discard)
        return True

    async def _run(self, entries: list[Entry], progress: ScrubProgress) -> None:
        cache = self._cache
        try:
            for entry in entries:
                if cache.index.peek(entry.key) is entry:
                    pace = Pace(self.rate)
                    before = cache.stats.digest_mismatches
                    await self._verifier.scrub(entry, pace)
                    found = cache.stats.digest_mismatches - before
                    progress.bytes_hashed += pace.bytes
                    progress.mismatches += found
                    self.total_bytes += pace.bytes
                    self.total_mismatches += found
                progress.checked += 1
                self.total_checked += 1
        finally:
            progress.running = False
            if progress.objects:
                logger.info(
                    "cache: %s verification: %d objects checked, %d mismatches, %d bytes hashed",
                    progress.reason,
                    progress.checked,
                    progress.mismatches,
                    progress.bytes_hashed,
                )


def _unit(key: str) -> str:
    """What one check covers: a whole object's key, or a slice's object's storage key."""
    return key.rpartition(SLICE_MARK)[0] if SLICE_MARK in key else key
