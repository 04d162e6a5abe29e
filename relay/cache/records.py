"""Records: small facts kept as cache objects (a registry tag's answer: which digest it names).

A record is an object with an empty body whose `Meta` holds the fact (`Meta.extra`). It is
stored by a fill of its own (`RecordFill`) that fetches nothing: run by the cache like any
fill (`Cache.start`: tracked, covered by a purge while it runs), it reserves its room in the
budget (`Cache.reserve`, evicting least recently used objects), writes its files by the
store's durable rule (a partial file created exclusively and fsynced, linked to its data name,
its record written atomically: `Store.publish`, `relay.disk`) and is published into the index
(`Cache.fill_stored`). So a record is counted in the budget, evicted, purged with its key or
prefix, loaded again at start, and shared by whatever shares the cache's index.

Writes of one key run one after the other; the caller's `keep` decides, right before a
written record enters the index, whether it still may (a record written meanwhile is newer:
the one just written is removed instead).

A record's key is the caller's, and must be built from what it is keyed by alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import httpx

from relay.cache.cache import Cache
from relay.cache.fill import Fill, Owner
from relay.cache.index import Entry
from relay.cache.partial import outlast
from relay.cache.store import Meta, Store
from relay.config import Route

logger = logging.getLogger(__name__)


def _write(store: Store, fill: Fill, meta: Meta) -> None:
    """Create the record's empty partial file, fsync it and publish it (blocking); the
    partial file is removed if that fails."""
    try:
        fd = store.open_partial(fill.partial)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        store.publish(fill.partial, meta)
    except BaseException:
        store.remove_partial(fill.partial)
        raise


class RecordFill(Fill):
    """Stores `meta` (with an empty body) under `key` (see the module). Its body is complete
    from the start: it is never background work the cache may stop, nor holds a connection."""

    def __init__(
        self,
        owner: Owner,
        *,
        key: str,
        route: Route,
        meta: Meta,
        keep: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__(
            owner,
            key=key,
            variant="identity",
            request=httpx.Request("GET", meta.url),
            route=route,
            revalidating=None,
        )
        self._record = meta
        self._keep = keep
        self._body_done = True

    async def run(self) -> None:
        self._started = True
        try:
            if not self._owner.reserve(self, 0):
                self.failed = "no room in the cache"
                return
            job = self._owner.disk.submit([self.key], _write, self._store, self, self._record)
            try:
                await asyncio.shield(job)
            except asyncio.CancelledError:
                await outlast(job)  # its files are complete or gone, never half-made
                raise
            if self.purged or not self._keep():
                # Purged while it was written, or a newer record is stored: this one goes.
                data = self._store.published_path(self.partial)
                self._owner.disk.submit([self.key], self._store.remove_all, [data])
                return
            self.published = True
            self.complete = True
            self._owner.fill_stored(self, self._record)
        except OSError as exc:
            self.failed = str(exc) or type(exc).__name__
            logger.warning("cache: cannot store the record %s: %s", self._record.url, exc)
        finally:
            self.finished = True
            self.headers_ready.set()
            self._notify()


async def store_record(
    cache: Cache,
    key: str,
    route: Route,
    meta: Meta,
    keep: Callable[[Entry | None], bool] = lambda stored: True,
) -> bool:
    """Store `meta` as the record under `key` (see the module), unless `keep` (given the
    record stored then, if any) says no when it is written; whether it was stored. A caller
    cancelled meanwhile leaves the store to finish (the cache tracks it)."""
    while (current := cache.fills.get(key)) is not None and not current.finished:
        await current.wait_finished()
    fill = RecordFill(
        cache, key=key, route=route, meta=meta, keep=lambda: keep(cache.index.peek(key))
    )
    cache.start(fill, key)
    await fill.wait_finished()
    return fill.published


__all__ = ["RecordFill", "store_record"]
