"""The cache: lookups, one fill per key, the budget, purge, and its lifespan.

Fills no client waits for (their clients left; prefetches, stale-while-revalidate
revalidations and slice read-ahead, started without one) are background work, and background
work never takes capacity from clients:
- at most `background_limit` run at once: `cache_background_fills`, and no more than
  `cache_background_share` of `max_connections` (at least one). A fill whose last client
  leaves when that many already run stops at once (nginx's default, `proxy_ignore_client_abort
  off`, closes the upstream when the client goes: relay keeps a bounded number going for the
  next client instead); a background fill is not started then (a prefetch is answered 503, a
  revalidation is left to the next request, a read-ahead to the client reaching that slice);
- a client's request that finds every upstream connection in use stops the background fill
  without a client for longest (`make_room`, called by `Upstream.open`), whose connection it
  then gets; a background fill's own requests never wait for a connection (they fail at once,
  as Varnish's background fetches do on a backend at its `max_connections`).
A stopped fill publishes nothing, as after `cache_fill_idle_timeout`; fills are only stopped
before their body is complete.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from relay.cache.fill import VARY_LEARNED, Fill
from relay.cache.index import Entry, Index
from relay.cache.key import SLICE_MARK, digest, path_of, slice_key, variant_key
from relay.cache.store import DATA, META, Meta, Store
from relay.config import Config, Route
from relay.disk import remove_quietly, write_atomically
from relay.errors import StartupError
from relay.net.presets import is_immutable
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
    background_stopped: int = 0


class Cache:
    def __init__(self, config: Config, upstream: Upstream, store: Store, index: Index) -> None:
        self.config = config
        self.upstream = upstream
        self.store = store
        self.index = index
        self.stats = CacheStats()
        self.max_object_bytes = config.cache_max_object_bytes or max(1, config.cache_max_bytes // 4)
        self.background_limit = min(
            config.cache_background_fills,
            max(1, int(config.cache_background_share * config.max_connections)),
        )
        """Fills that may run with no client waiting (see the module's docstring)."""
        self.fills: dict[str, Fill] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._passes: dict[str, float] = {}
        self.sliced: set[str] = set()
        """Storage keys of objects with stored slices or slice fills started (a hint: a whole
        GET of one is answered from its slices)."""
        self.slice_revalidations: dict[str, Fill] = {}
        """Storage key -> the one conditional request refreshing that object's slices."""
        self.verifying: dict[str, asyncio.Task[None]] = {}
        """Storage key -> the check of a complete sliced object's digest, while it runs."""

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
        revalidating: Entry | None = None,
        sha256: str | None = None,
    ) -> Fill:
        """The fill of one aligned slice (in flight, or a new one). `revalidating`: the stale
        stored slice; the request is then conditional (If-None-Match / If-Modified-Since
        with the Range): a 304 refreshes every slice of the object, anything else drops them
        and stores this slice of the new version. `sha256`: the whole object's digest (a
        content-addressed object), checked once every slice is stored."""
        storage = self.storage_key(base, variant)
        key = slice_key(storage, index)
        current = self.fills.get(key)
        if current is not None and not current.finished:
            return current
        size = self.config.cache_slice_bytes
        first = index * size
        request.headers["range"] = f"bytes={first}-{first + size - 1}"
        if revalidating is not None:
            request.headers.update(_conditionals(revalidating.meta))
            self.stats.revalidations += 1
        elif validator is not None:
            request.headers["if-range"] = validator
        fill = self._new_fill(key, variant, request, route, revalidating)
        fill.slice = (first, first + size - 1, validator)
        fill.sha256 = sha256
        fill.immutable = is_immutable(route, path_of(base, route.prefix))
        fill.object_key = storage
        self.sliced.add(storage)
        if revalidating is not None:
            self.slice_revalidations[storage] = fill
        self._start(fill, base)
        return fill

    def slice_revalidation(self, base: str, variant: str) -> Fill | None:
        """The conditional request refreshing this object's slices, if one is in flight."""
        fill = self.slice_revalidations.get(self.storage_key(base, variant))
        return fill if fill is not None and fill.going else None

    def has_slices(self, base: str, variant: str) -> bool:
        return self.storage_key(base, variant) in self.sliced

    def slice_entry(self, base: str, variant: str, index: int) -> Entry | None:
        return self.index.get(slice_key(self.storage_key(base, variant), index))

    def drop_slices(self, base: str, variant: str) -> int:
        return self._drop_slices_of(self.storage_key(base, variant))

    def _drop_slices_of(self, storage: str) -> int:
        self.sliced.discard(storage)
        prefix = slice_key(storage, "")
        return sum(self.drop(key) for key in self.index.keys_with_prefix(prefix))

    def _slices_of(self, storage: str) -> list[Entry]:
        prefix = slice_key(storage, "")
        return [e for k in self.index.keys_with_prefix(prefix) if (e := self.index.peek(k))]

    def fill_in_flight(self, base: str, variant: str) -> Fill | None:
        """The fill of this key, if one runs and is not being stopped."""
        fill = self.fills.get(self.storage_key(base, variant))
        return fill if fill is not None and fill.going else None

    # ---- fills --------------------------------------------------------------------------

    def fill(
        self,
        base: str,
        variant: str,
        request: httpx.Request,
        route: Route,
        revalidating: Entry | None = None,
        sha256: str | None = None,
    ) -> Fill:
        """The fill of this key in flight, or a new one (started as a tracked task); `sha256`:
        the digest the body must have to be stored (a content-addressed object)."""
        key = self.storage_key(base, variant)
        current = self.fills.get(key)
        if current is not None and not current.finished:
            return current
        if revalidating is not None:
            request.headers.update(_conditionals(revalidating.meta))
            self.stats.revalidations += 1
        fill = self._new_fill(key, variant, request, route, revalidating)
        fill.sha256 = sha256
        fill.immutable = is_immutable(route, path_of(base, route.prefix))
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
            on_replaced=self._replaced,
            count_upstream_bytes=self._count_upstream,
            on_clientless=self._lost_clients,
        )

    def _start(self, fill: Fill, base: str) -> None:
        self.fills[fill.key] = fill
        task = asyncio.create_task(self._run(fill, base), name=f"cache fill {fill.key[:80]}")
        fill.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, fill: Fill, base: str) -> None:
        try:
            await fill.run()
        finally:
            if self.fills.get(fill.key) is fill:
                del self.fills[fill.key]
            if fill.object_key and self.slice_revalidations.get(fill.object_key) is fill:
                del self.slice_revalidations[fill.object_key]
            if (
                fill.object_key
                and fill.passthrough is not None
                and not self._slices_of(fill.object_key)
            ):
                # No slice stored (no byte ranges, say): whole GETs are not sent to slices.
                self.sliced.discard(fill.object_key)
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
                # A new answer that may not be stored replaces the stored one; an upstream
                # error (5xx) does not: the stored object stays for stale-if-error, which
                # the clients waiting on this revalidation are about to read.
                if fill.revalidating is not None and (fill.upstream_status or 0) < 500:
                    self.drop(fill.key)

    # ---- background fills ---------------------------------------------------------------

    def background_fill(
        self,
        base: str,
        variant: str,
        request: httpx.Request,
        route: Route,
        revalidating: Entry | None = None,
        sha256: str | None = None,
    ) -> Fill | None:
        """The fill of this key in flight, or a new one started with no client (a prefetch,
        a revalidation nobody waits for) if there is room for one; None if not (or if the
        fill of this key is being stopped)."""
        current = self.fills.get(self.storage_key(base, variant))
        if current is not None and not current.finished:
            return current if current.going else None
        if not self.room_for_background():
            return None
        return self.fill(base, variant, request, route, revalidating, sha256)

    def room_for_background(self) -> bool:
        return self.background_fills() < self.background_limit

    def background_fills(self) -> int:
        """Fills running with no client waiting."""
        return sum(1 for fill in self.fills.values() if fill.background)

    def _lost_clients(self, fill: Fill) -> None:
        """The last client of `fill` is gone: it runs on as background work if there is room,
        else it stops."""
        if not fill.stoppable:
            return
        others = sum(1 for f in self.fills.values() if f is not fill and f.background)
        if others >= self.background_limit:
            self._stop(fill, "no client left, and cache_background_fills fills run without one")

    def make_room(self) -> bool:
        """Stop the fill without a client for longest that holds (or is opening) an upstream
        connection, for a client's request that found the pool full; False if there is none."""
        candidates = [f for f in self.fills.values() if f.background and f.using_upstream]
        if not candidates:
            return False
        self._stop(min(candidates, key=lambda f: f.idle_since), "its connection went to a client")
        return True

    def _stop(self, fill: Fill, reason: str) -> None:
        fill.stop(reason)
        self.stats.background_stopped += 1

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
        if SLICE_MARK in entry.key:
            # The hint goes with the object's first evicted slice (a whole GET then fills the
            # object whole; a slice stored later adds it back), so it stays bounded by what
            # the cache holds.
            self.sliced.discard(entry.key.rpartition(SLICE_MARK)[0])
        self.stats.evictions += 1
        logger.info("cache: evicted %s (%d bytes)", entry.meta.url, entry.size)

    def _stored(self, fill: Fill, meta: Meta) -> None:
        self.index.add(Entry(fill.key, fill.directory, meta))
        if fill.object_key:
            self.sliced.add(fill.object_key)
            self._verify_when_complete(fill.object_key, meta)

    def _refreshed(self, fill: Fill, meta: Meta) -> None:
        entry = self.index.get(fill.key)
        if entry is None:
            return
        entry.meta = meta
        _write_meta(entry)
        if not fill.object_key:
            return
        # A 304 for one slice is a 304 for the object: every slice of it is fresh again.
        for other in self._slices_of(fill.object_key):
            if other is entry or other.meta.validator != meta.validator:
                continue
            other.meta = dataclasses.replace(
                other.meta,
                headers=meta.headers,
                stored_at=meta.stored_at,
                initial_age=meta.initial_age,
                lifetime=meta.lifetime,
            )
            _write_meta(other)

    def _replaced(self, fill: Fill) -> None:
        """A conditional request for a stale slice was answered with a body: the object's
        stored slices are another version (or no longer to be trusted): all dropped."""
        if fill.object_key:
            dropped = self._drop_slices_of(fill.object_key)
            logger.info("cache: %d stale slices replaced (%s)", dropped, fill.object_key[:80])

    # ---- digests of sliced objects ------------------------------------------------------

    def _verify_when_complete(self, storage: str, meta: Meta) -> None:
        """Once every slice of an object whose upstream announced a whole-object SHA-256 is
        stored (one version), hash them in order off the loop; a mismatch drops them all."""
        expected = meta.extra.get("repr-sha256")
        total = int(meta.extra.get("total", "0"))
        size = self.config.cache_slice_bytes
        if not expected or total <= 0:
            return
        entries: list[Entry] = []
        for index in range((total + size - 1) // size):
            entry = self.index.peek(slice_key(storage, index))
            if (
                entry is None
                or entry.meta.validator != meta.validator
                or entry.meta.extra.get("repr-sha256") != expected
            ):
                return
            entries.append(entry)
        task = asyncio.create_task(
            self._verify_slices(storage, entries, expected), name=f"cache verify {storage[:80]}"
        )
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        self.verifying[storage] = task
        task.add_done_callback(
            lambda done: (
                self.verifying.pop(storage, None) if self.verifying.get(storage) is done else None
            )
        )

    async def slices_verified(self, base: str, variant: str, entries: list[Entry]) -> bool:
        """Wait for the digest check of this object's slices, if one runs; whether `entries`
        (the slices an answer was made of) are all still stored (a mismatch drops them)."""
        task = self.verifying.get(self.storage_key(base, variant))
        if task is not None:
            await asyncio.wait({task})
        return all(self.index.peek(entry.key) is entry for entry in entries)

    async def _verify_slices(self, storage: str, entries: list[Entry], expected: str) -> None:
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        directories = [e.directory for e in entries]
        try:
            actual = await loop.run_in_executor(None, _hash_files, directories, stop)
        except OSError:
            return  # a slice was evicted or purged meanwhile: nothing left to judge
        finally:
            stop.set()  # cancelled (relay stopping): the thread stops at its next read
        if actual is None:
            return
        if actual == expected:
            logger.info("cache: sliced object verified (%s)", entries[0].meta.url)
            return
        if any(self.index.peek(e.key) is not e for e in entries):
            return  # replaced meanwhile: the new version is judged when it is complete
        self.stats.digest_mismatches += 1
        self._drop_slices_of(storage)
        logger.warning(
            "cache: slices of %s hash to %s, not the announced %s: dropped",
            entries[0].meta.url,
            actual,
            expected,
        )

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
        self.sliced = {k for k in self.sliced if k != base and not k.startswith(base + "\x00")}
        return count

    def purge_prefix(self, prefix: str) -> int:
        """Drop every object whose key starts with `prefix` (a route prefix + path prefix)."""
        count = 0
        for key in self.index.keys_with_prefix(prefix):
            count += self.drop(key)
        for base in [b for b in self.index.vary if b.startswith(prefix)]:
            del self.index.vary[base]
        self._passes = {k: v for k, v in self._passes.items() if not k.startswith(prefix)}
        self.sliced = {k for k in self.sliced if not k.startswith(prefix)}
        return count

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


def _write_meta(entry: Entry) -> None:
    try:
        write_atomically(entry.directory / META, entry.meta.to_json())
    except OSError as exc:
        logger.warning("cache: cannot refresh %s: %s", entry.meta.url, exc)


def _hash_files(directories: list[Path], stop: threading.Event) -> str | None:
    """The SHA-256 of the slices' data files joined in order (None if stopped)."""
    digest_ = hashlib.sha256()
    for directory in directories:
        fd = os.open(directory / DATA, os.O_RDONLY)
        try:
            while chunk := os.read(fd, 1024 * 1024):
                if stop.is_set():
                    return None
                digest_.update(chunk)
        finally:
            os.close(fd)
    return digest_.hexdigest()


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
    upstream.make_room = cache.make_room
    cache.sliced.update(
        entry.key.rsplit(SLICE_MARK, 1)[0] for entry in index.entries() if SLICE_MARK in entry.key
    )
    for victim in index.victims(0):
        cache._evict(victim)
    logger.info("cache: %d objects, %d bytes in %s", len(index), index.stored, config.cache_dir)
    try:
        yield cache
    finally:
        upstream.make_room = None
        await cache.close()
