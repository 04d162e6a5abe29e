"""The cache: lookups, one fill per key, the budget, purge, and its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from relay.cache.fill import VARY_LEARNED, Fill
from relay.cache.index import Entry, Index
from relay.cache.key import digest, slice_key, variant_key
from relay.cache.store import DATA, META, Meta, Store
from relay.config import Config, Route
from relay.disk import remove_quietly, write_atomically
from relay.errors import StartupError
from relay.net.upstream import Upstream

logger = logging.getLogger(__name__)

#: How long a key whose response was not storable is relayed without trying to store it.
PASS_SECONDS = 30.0


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    revalidations: int = 0
    stale: int = 0
    coalesced: int = 0
    bytes_from_cache: int = 0
    bytes_zero_copy: int = 0
    bytes_from_upstream: int = 0
    evictions: int = 0
    digest_mismatches: int = 0
    fills_failed: int = 0


class Cache:
    def __init__(self, config: Config, upstream: Upstream, store: Store, index: Index) -> None:
        self.config = config
        self.upstream = upstream
        self.store = store
        self.index = index
        self.stats = CacheStats()
        self.max_object_bytes = config.cache_max_object_bytes or max(1, config.cache_max_bytes // 4)
        self.fills: dict[str, Fill] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._passes: dict[str, float] = {}

    # ---- lookups ------------------------------------------------------------------------

    def storage_key(self, base: str, variant: str) -> str:
        if self.index.vary.get(base) == "accept-encoding":
            return variant_key(base, variant)
        return base

    def lookup(self, base: str, variant: str) -> Entry | None:
        return self.index.get(self.storage_key(base, variant))

    def passing(self, key: str) -> bool:
        until = self._passes.get(key)
        if until is None:
            return False
        if until < time.monotonic():
            del self._passes[key]
            return False
        return True

    def slice_fill(
        self,
        base: str,
        variant: str,
        index: int,
        request: httpx.Request,
        route: Route,
        validator: str | None,
    ) -> Fill:
        """The fill of one aligned slice (in flight, or a new one)."""
        key = slice_key(self.storage_key(base, variant), index)
        current = self.fills.get(key)
        if current is not None and not current.finished:
            return current
        size = self.config.cache_slice_bytes
        first = index * size
        request.headers["range"] = f"bytes={first}-{first + size - 1}"
        if validator is not None:
            request.headers["if-range"] = validator
        fill = self._new_fill(key, variant, request, route, None)
        fill.slice = (first, first + size - 1, validator)
        self._start(fill, base)
        return fill

    def slice_entry(self, base: str, variant: str, index: int) -> Entry | None:
        return self.index.get(slice_key(self.storage_key(base, variant), index))

    def drop_slices(self, base: str, variant: str) -> int:
        prefix = slice_key(self.storage_key(base, variant), "")
        return sum(self.drop(key) for key in self.index.keys_with_prefix(prefix))

    def fill_in_flight(self, base: str, variant: str) -> Fill | None:
        fill = self.fills.get(self.storage_key(base, variant))
        return fill if fill is not None and not fill.finished else None

    # ---- fills --------------------------------------------------------------------------

    def fill(
        self,
        base: str,
        variant: str,
        request: httpx.Request,
        route: Route,
        revalidating: Entry | None = None,
    ) -> Fill:
        """The fill of this key in flight, or a new one (started as a tracked task)."""
        key = self.storage_key(base, variant)
        current = self.fills.get(key)
        if current is not None and not current.finished:
            return current
        if revalidating is not None:
            request.headers.update(_conditionals(revalidating.meta))
            self.stats.revalidations += 1
        fill = self._new_fill(key, variant, request, route, revalidating)
        self._start(fill, base)
        return fill

    def _new_fill(
        self,
        key: str,
        variant: str,
        request: httpx.Request,
        route: Route,
        revalidating: Entry | None,
    ) -> Fill:
        return Fill(
            key=key,
            variant=variant,
            directory=self.store.dir_for(digest(key)),
            request=request,
            route=route,
            upstream=self.upstream,
            revalidating=revalidating.meta if revalidating is not None else None,
            resume_attempts=self.config.resume_attempts,
            max_object_bytes=self.max_object_bytes,
            idle_timeout=self.config.cache_fill_idle_timeout,
            reserve=self._reserve,
            on_stored=self._stored,
            on_refreshed=self._refreshed,
            count_upstream_bytes=self._count_upstream,
        )

    def _start(self, fill: Fill, base: str) -> None:
        self.fills[fill.key] = fill
        task = asyncio.create_task(self._run(fill, base), name=f"cache fill {fill.key[:80]}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, fill: Fill, base: str) -> None:
        try:
            await fill.run()
        finally:
            if self.fills.get(fill.key) is fill:
                del self.fills[fill.key]
            self.index.reserved -= fill.reserved
            fill.reserved = 0
            self.stats.coalesced += fill.coalesced
            if fill.failed is not None and fill.failed != "cancelled":
                self.stats.fills_failed += 1
            if fill.digest_mismatch:
                self.stats.digest_mismatches += 1
                self.drop(fill.key)
            if fill.passthrough == VARY_LEARNED:
                self.index.vary[base] = "accept-encoding"
            elif fill.passthrough is not None and fill.slice is None:
                self._passes[fill.key] = time.monotonic() + PASS_SECONDS
                if fill.revalidating is not None:
                    self.drop(fill.key)

    def _count_upstream(self, size: int) -> None:
        self.stats.bytes_from_upstream += size

    def _reserve(self, fill: Fill, size: int) -> bool:
        """Make room for `size` more bytes of a fill, evicting least recently used objects."""
        if fill.reserved + size > self.max_object_bytes:
            return False
        for victim in self.index.victims(size, keep=fill.key):
            self._evict(victim)
        if self.index.stored + self.index.reserved + size > self.index.max_bytes:
            return False
        fill.reserved += size
        self.index.reserved += size
        return True

    def _evict(self, entry: Entry) -> None:
        # Unlinked, never truncated: a reader streaming it keeps its descriptor.
        self.index.remove(entry.key)
        remove_quietly(entry.directory / META)
        remove_quietly(entry.directory / DATA)
        self.stats.evictions += 1
        logger.info("cache: evicted %s (%d bytes)", entry.meta.url, entry.size)

    def _stored(self, fill: Fill, meta: Meta) -> None:
        self.index.add(Entry(fill.key, fill.directory, meta))

    def _refreshed(self, fill: Fill, meta: Meta) -> None:
        entry = self.index.get(fill.key)
        if entry is None:
            return
        entry.meta = meta
        try:
            write_atomically(fill.directory / META, meta.to_json())
        except OSError as exc:
            logger.warning("cache: cannot refresh %s: %s", meta.url, exc)

    # ---- purge --------------------------------------------------------------------------

    def drop(self, key: str) -> bool:
        entry = self.index.remove(key)
        if entry is None:
            return False
        remove_quietly(entry.directory / META)
        remove_quietly(entry.directory / DATA)
        return True

    def purge_key(self, base: str) -> int:
        """Drop the object of one URL, every encoding variant included."""
        count = int(self.drop(base))
        for key in self.index.keys_with_prefix(base + "\x00"):
            count += self.drop(key)
        self.index.vary.pop(base, None)
        self._passes.pop(base, None)
        return count

    def purge_prefix(self, prefix: str) -> int:
        """Drop every object whose key starts with `prefix` (a route prefix + path prefix)."""
        count = 0
        for key in self.index.keys_with_prefix(prefix):
            count += self.drop(key)
        for base in [b for b in self.index.vary if b.startswith(prefix)]:
            del self.index.vary[base]
        self._passes = {k: v for k, v in self._passes.items() if not k.startswith(prefix)}
        return count

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _conditionals(meta: Meta) -> dict[str, str]:
    headers = httpx.Headers(meta.headers)
    out: dict[str, str] = {}
    if "etag" in headers:
        out["if-none-match"] = headers["etag"]
    if "last-modified" in headers:
        out["if-modified-since"] = headers["last-modified"]
    return out


@contextlib.asynccontextmanager
async def open_cache(config: Config, upstream: Upstream) -> AsyncIterator[Cache | None]:
    """The cache for the app's lifespan (None when cache_dir is not set); its fills are
    cancelled and awaited when the app stops."""
    if not config.cache_dir:
        yield None
        return
    store = Store(Path(config.cache_dir))
    index = Index(config.cache_max_bytes)
    try:
        store.prepare()
        loaded = await asyncio.get_running_loop().run_in_executor(None, store.load)
    except OSError as exc:
        raise StartupError(f"cache_dir {config.cache_dir!r}: {exc.strerror}") from None
    for directory, meta, _size in loaded:
        index.add(Entry(meta.key, directory, meta))
        if meta.vary == "accept-encoding":
            index.vary[meta.key.rsplit("\x00ae=", 1)[0]] = "accept-encoding"
    cache = Cache(config, upstream, store, index)
    for victim in index.victims(0):
        cache._evict(victim)
    logger.info("cache: %d objects, %d bytes in %s", len(index), index.stored, config.cache_dir)
    try:
        yield cache
    finally:
        await cache.close()
