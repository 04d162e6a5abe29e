"""A worker's fills of misses when several workers share the cache: each is led by the worker
that takes its key's fill lock (`relay.cache.workers.lead`), or follows the leader's fill
(`relay.cache.workers.follow`).

The leader, before its fill runs, removes what a leader of the same key that died left (its
partial file, its head, a data file never given its record: `Lead.previous`); while it runs,
writes the fill's head as soon as it is known (`Store.write_head`, for its followers), if its
body is to be stored; once it is over (published, or its partial file removed) removes the
head, then releases the lock. Revalidations and slices are not led: each worker runs its own.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from relay.cache.executor import DiskExecutor
from relay.cache.fill import Fill, Owner
from relay.cache.key import digest
from relay.cache.store import Store
from relay.cache.workers.follow import Follower
from relay.cache.workers.lead import Lead, Locks
from relay.config import Route

logger = logging.getLogger(__name__)


class Leading:
    def __init__(self, locks: Locks, store: Store, executor: DiskExecutor) -> None:
        self.locks = locks
        self._store = store
        self._executor = executor

    def take(self, fill: Fill) -> tuple[Lead | None, str | None]:
        """Take the key's fill lock for `fill` (its lead), or find the version of the fill
        another worker runs (to follow); (None, None) in the rare case the lock keeps
        changing hands (the fill then runs on its own, as with one worker)."""
        name = digest(fill.key)
        try:
            for _ in range(3):
                lead = self.locks.lead(name, self._store.version_of(fill.partial))
                if lead is not None:
                    return lead, None
                leader = self.locks.leader(name)
                if leader is not None:
                    return None, leader
        except OSError as exc:
            # No lock file to be had (disk full, no descriptors, a lock file that keeps being
            # replaced): the fill runs on its own, as with one worker, never a 500.
            logger.warning("cache: cannot take a fill lock, filling without it: %s", exc)
        return None, None

    def follower(
        self, owner: Owner, fill: Fill, version: str, request: httpx.Request, route: Route
    ) -> Follower:
        """What runs instead of `fill` when another worker leads its key (`version`)."""
        return Follower(
            owner,
            key=fill.key,
            variant=fill.variant,
            request=request,
            route=route,
            locks=self.locks,
            version=version,
        )

    def release_on(self, task: asyncio.Task[None], lead: Lead) -> None:
        """Release `lead` when `task` is done, whatever happened: a task cancelled before its
        first step never runs its `finally` (`run`'s release comes first; this one is then a
        no-op)."""
        task.add_done_callback(lambda _: self.locks.release(lead))

    async def run(self, fill: Fill, lead: Lead) -> None:
        """Run `fill` holding its key's fill lock (see the module's docstring)."""
        announce: asyncio.Task[None] | None = None
        try:
            if lead.previous is not None:
                await self._executor.run(self._store.remove_leftovers, fill.key, lead.previous)
            announce = asyncio.create_task(self._announce(fill), name="cache fill head")
            await fill.run()
        finally:
            try:
                if announce is not None:
                    # Not cancelled: it ends once the fill's head is ready (always set by the
                    # time `run` returns), and a head it wrote after the removal below would
                    # stay. Cancelled again while waiting: it is cancelled too (a head it left
                    # is the next leader's leftover), and the lock is released all the same.
                    try:
                        await asyncio.wait({announce})
                    except asyncio.CancelledError:
                        announce.cancel()
                        raise
                await asyncio.shield(self._executor.run(self._store.remove_head, fill.partial))
            finally:
                self.locks.release(lead)

    async def _announce(self, fill: Fill) -> None:
        """Write the head of `fill` for the workers following it, once it is known, if its
        body is to be stored (an answer not stored is not followed: see `Follower`)."""
        await fill.headers_ready.wait()
        if fill.read_fd is None or fill.meta is None or fill.passthrough is not None:
            return
        if fill.finished or fill.purged:
            return
        try:
            await self._executor.run(self._store.write_head, fill.partial, fill.meta, fill.length)
        except OSError as exc:
            # Its followers see no head: their clients are relayed (`Follower`).
            logger.warning("cache: cannot write a fill's head for other workers: %s", exc)


__all__ = ["Leading"]


def release_when_done(task: asyncio.Task[None], leading: Leading | None, lead: Lead | None) -> None:
    """`Leading.release_on` for a fill that took a lead (several workers); nothing otherwise."""
    if leading is not None and lead is not None:
        leading.release_on(task, lead)
