"""A fill run by another worker, followed: its clients here read the leader's partial file.

When a worker asks for an object another worker is filling (it could not take the key's fill
lock: `relay.cache.workers.lead`), it runs a `Follower` instead of a `Fill`: the same object to
its clients (they join it, read it through `read_fd` from the first byte, hold its last byte
until it is `complete`), but it asks the upstream nothing. It learns, by looking at the files
(bounded polling: `Backoff`):

- the head: the leader writes the record it will publish as soon as it knows it (a `.head`
  file, `Store.write_head`), before its first body byte; until then the follower's clients
  wait, as a fill's wait for its upstream's head;
- the progress: the size of the partial file (it is written in order, so its first `size`
  bytes are there); the follower opens it once and keeps its descriptor, whatever becomes of
  its name (published: linked to `.data`; removed);
- the end: the leader's lock is free (it is over, or its process died). If the version's
  record was published with the length the file has, the body is whole and verified (the
  leader checks digests before it publishes): `complete`, and the last byte goes out. If not
  (the leader gave up, failed a digest, was purged, or was killed), the follower fails and its
  readers' transfers are aborted: never a clean short body. The next request fills again.

A leader whose answer is not to be stored (an error, `no-store`, too large...) writes no head:
the follower then ends with no answer (`meta` None) and its clients are relayed each on its
own (the cost: one more upstream request per worker whose clients waited, not per client).
A follower whose clients all left stops following.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

import httpx

from relay.cache.fill import Fill, FillAbandoned, Owner
from relay.cache.key import digest
from relay.cache.store import Meta
from relay.cache.workers.lead import Locks
from relay.config import Route

logger = logging.getLogger(__name__)

#: The first wait between two looks at a leader's files, and the longest (doubling from one
#: to the other while nothing changes; back to the first after progress).
FIRST_POLL = 0.001
LONGEST_POLL = 0.05


class Backoff:
    """The waits between looks at another process's files (sans-IO): `FIRST_POLL`, doubling
    up to `LONGEST_POLL` while nothing changes, back to the first at each change."""

    __slots__ = ("_next", "first", "longest")

    def __init__(self, first: float = FIRST_POLL, longest: float = LONGEST_POLL) -> None:
        self.first = first
        self.longest = longest
        self._next = first

    def next(self) -> float:
        wait = self._next
        self._next = min(self.longest, wait * 2)
        return wait

    def progress(self) -> None:
        self._next = self.first


class LeaderGone(Exception):
    """The fill followed ended without publishing what it was writing."""


class Follower(Fill):
    """Follows the fill of `version` run by another worker (see the module's docstring).

    `sleep`: how it waits between looks (injected by the tests)."""

    def __init__(
        self,
        owner: Owner,
        *,
        key: str,
        variant: str,
        request: httpx.Request,
        route: Route,
        locks: Locks,
        version: str,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(
            owner, key=key, variant=variant, request=request, route=route, revalidating=None
        )
        self._locks = locks
        self.version = version
        self.partial = self._store.partial_of(self.key, version)
        self._lock_name = digest(self.key)
        self._sleep = sleep
        self._backoff = Backoff()

    @property
    def using_upstream(self) -> bool:
        return False

    async def run(self) -> None:
        self._started = True
        try:
            if self.stopping is not None:
                raise FillAbandoned(self.stopping)
            await self._follow()
        except asyncio.CancelledError:
            if not self.stopped_by_cache():
                raise
        except FillAbandoned as exc:
            self.failed = str(exc)
        except LeaderGone as exc:
            self.failed = str(exc)
            logger.info("cache: %s (%s)", exc, self._request.url.path)
        except OSError as exc:
            self.failed = str(exc) or type(exc).__name__
            logger.warning("cache: following a fill failed: %s (%s)", exc, self._request.url.path)
        finally:
            if not self.clients.any:
                self._close_reader()  # else the last client's release closes it
            self.finished = True
            self.headers_ready.set()
            self._notify()

    async def _follow(self) -> None:
        store = self._store
        run = self._owner.executor.run
        while True:
            head = await run(store.read_head, self.partial)
            if head is not None:
                break
            if not self._locks.held(self._lock_name, self.version):
                # Over before we saw its head: stored (then read from its data), or not.
                head = await run(store.read_head, self.partial)
                if head is None:
                    await self._published_already()
                    return
                break
            self._idle()
            await self._sleep(self._backoff.next())
        meta, length = head
        self.read_fd = await run(_open_either, self.partial, store.published_path(self.partial))
        self.meta = meta
        self.length = length
        self.headers_ready.set()
        while True:
            # A few system calls on metadata (open, flock, pread, fstat): made on the loop,
            # as a thread hop for each would cost more than the calls.
            held = self._locks.held(self._lock_name, self.version)
            size = _size(self.read_fd)
            if size > self.written:
                self.written = size if length is None else min(size, length)
                self._notify()
                self._backoff.progress()
            if not held:
                await self._ended(await run(store.read_published, self.partial))
                return
            self._idle()
            await self._sleep(self._backoff.next())

    async def _published_already(self) -> None:
        """The leader ended before its head was seen: its stored object, if it stored one,
        answers as a finished fill; else the clients are relayed (no `meta`)."""
        meta = await self._owner.executor.run(self._store.read_published, self.partial)
        if meta is None:
            raise LeaderGone("the fill followed in another worker stored nothing")
        try:
            fd = await self._owner.executor.run(_open, self._store.published_path(self.partial))
        except FileNotFoundError:
            raise LeaderGone("the object filled in another worker is gone already") from None
        self.read_fd = fd
        self.meta = meta
        self.length = self.written = meta.length
        self.complete = self.published = True

    async def _ended(self, published: Meta | None) -> None:
        """The leader's lock is free: the body is whole only if it published it, at the
        length this file has."""
        assert self.read_fd is not None
        size = _size(self.read_fd)
        if published is None or published.length != size:
            raise LeaderGone(
                f"the fill followed in another worker ended after {size} bytes unpublished"
            )
        self.written = self.length = size
        self.meta = published
        self.complete = self.published = True

    def _idle(self) -> None:
        if not self.clients.any:
            raise FillAbandoned("no client left")


def _open(path: os.PathLike[str]) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))


def _open_either(partial: os.PathLike[str], data: os.PathLike[str]) -> int:
    """The partial file, or the data file it became if it was published meanwhile."""
    try:
        return _open(partial)
    except FileNotFoundError:
        return _open(data)


def _size(fd: int) -> int:
    return os.fstat(fd).st_size


__all__ = ["FIRST_POLL", "LONGEST_POLL", "Backoff", "Follower", "LeaderGone"]
