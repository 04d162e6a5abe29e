"""The cache: lookups, one fill per key, the budget and eviction, purge, and its lifespan.

Sliced objects are `relay.cache.slices`' (`Cache.slices`); files on disk `relay.cache.store`'s.

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
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import httpx

from relay.cache.bounded import Passes
from relay.cache.clock import SYSTEM_CLOCK, Clock
from relay.cache.fill import TOO_LARGE, VARY_LEARNED, Fill
from relay.cache.index import Entry, Index
from relay.cache.key import VARIANT_MARK, path_of, variant_key
from relay.cache.policy import conditional_headers
from relay.cache.slices import Slices
from relay.cache.store import Meta, Store
from relay.config import Config, Route
from relay.errors import StartupError
from relay.net.presets import is_immutable
from relay.net.routing import RouteTable
from relay.net.upstream import Upstream

logger = logging.getLogger(__name__)

#: How long a key whose answer was neither stored nor shared (meant for one client, too large,
#: varying beyond the key) is relayed to each client on its own (hit-for-pass). An answer that
#: was shared (an error, a redirect, `no-store`) sets no pass: the next requests are filled
#: again, together, and stored if the answer then may be (hit-for-miss).
PASS_SECONDS = 30.0
#: How long an object found larger than `cache_max_object_bytes` is relayed without a fill
#: (its size changes only with a new version; its ranges cost no slice fetch meanwhile).
TOO_LARGE_PASS_SECONDS = 600.0


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
    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        store: Store,
        index: Index,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.config = config
        self.clock = clock
        self.upstream = upstream
        self.store = store
        self.index = index
        self.stats = CacheStats()
        self.max_object_bytes = config.cache_max_object_bytes or max(1, config.cache_max_bytes // 4)
        self.routes = RouteTable(config.routes)
        self.background_limit = min(
            config.cache_background_fills,
            max(1, int(config.cache_background_share * config.max_connections)),
        )
        """Fills that may run with no client waiting (see the module's docstring)."""
        self.fills: dict[str, Fill] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.passes = Passes(clock)
        """Pass markers: keys relayed without trying to store them (bounded, expiring)."""
        self.slices = Slices(self)

    # ---- lookups ------------------------------------------------------------------------

    def storage_key(self, base: str, variant: str) -> str:
        vary = self.index.vary
        if vary.get(base) == "accept-encoding":
            vary.move_to_end(base)
            return variant_key(base, variant)
        return base

    def lookup(self, base: str, variant: str) -> Entry | None:
        return self.index.get(self.storage_key(base, variant))

    def passing(self, key: str) -> bool:
        return self.passes.active(key)

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
            request.headers.update(conditional_headers(revalidating.meta.headers))
            self.stats.revalidations += 1
        fill = self.new_fill(key, variant, request, route, revalidating)
        fill.sha256 = sha256
        fill.immutable = is_immutable(route, path_of(base, route.prefix))
        self.start(fill, base)
        return fill

    def new_fill(
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
            store=self.store,
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
            on_replaced=self.slices.replaced,
            count_upstream_bytes=self._count_upstream,
            clock=self.clock,
            on_clientless=self._lost_clients,
            routes=self.routes,
        )

    def start(self, fill: Fill, base: str) -> None:
        """Run the fill as a tracked task; `base`: its object's base key."""
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
            if fill.object_key:
                self.slices.finished(fill)
            self.index.reserved -= fill.reserved
            fill.reserved = 0
            self.stats.coalesced += fill.coalesced
            if fill.failed is not None and fill.failed != "cancelled":
                self.stats.fills_failed += 1
            if fill.digest_mismatch:
                self.stats.digest_mismatches += 1
                self.drop(fill.key)
            if fill.purged:
                pass  # a purge covers the fill: nothing it learned is kept
            elif fill.passthrough == VARY_LEARNED:
                self.index.vary[base] = "accept-encoding"
            elif fill.passthrough is not None and (fill.slice is None or fill.passes_object):
                if not fill.shared:
                    # A slice fill's reason may be the object's own: its key is passed, so its
                    # other ranges are relayed with the client's own Range, no slice fetched.
                    too_large = fill.passthrough == TOO_LARGE
                    seconds = TOO_LARGE_PASS_SECONDS if too_large else PASS_SECONDS
                    self.passes.set(fill.object_key or fill.key, seconds)
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
        self.index.remove(entry.key)
        self.store.remove(entry)
        self.slices.evicted(entry.key)
        self.stats.evictions += 1
        logger.info("cache: evicted %s (%d bytes)", entry.meta.url, entry.size)

    def _stored(self, fill: Fill, meta: Meta) -> None:
        self.index.add(Entry(fill.key, fill.directory, meta))
        if fill.object_key:
            self.slices.stored(fill, meta)

    def _refreshed(self, fill: Fill, meta: Meta) -> None:
        entry = self.index.get(fill.key)
        if entry is None:
            return
        entry.meta = meta
        self.store.rewrite_meta(entry)
        if fill.object_key:
            self.slices.refreshed(fill, entry, meta)

    # ---- purge --------------------------------------------------------------------------

    def drop(self, key: str) -> bool:
        entry = self.index.remove(key)
        if entry is None:
            return False
        self.store.remove(entry)
        return True

    def purge_key(self, base: str) -> int:
        """Drop the object of one URL, every encoding variant, index form and slice included,
        and what is being filled of it; how many objects and fills that was."""

        def covered(key: str) -> bool:
            return key == base or key.startswith(base + "\x00")

        count = int(self.drop(base))
        for key in self.index.keys_with_prefix(base + "\x00"):
            count += self.drop(key)
        count += self._purge_fills(covered)
        self.index.vary.pop(base, None)
        self.passes.drop(base)
        self.passes.drop_prefix(base + "\x00")
        self.slices.purge_key(base)
        return count

    def purge_prefix(self, prefix: str) -> int:
        """Drop every object whose key starts with `prefix` (a route prefix + path prefix),
        and what is being filled under it; how many objects and fills that was."""
        count = 0
        for key in self.index.keys_with_prefix(prefix):
            count += self.drop(key)
        count += self._purge_fills(lambda key: key.startswith(prefix))
        for base in [b for b in self.index.vary if b.startswith(prefix)]:
            del self.index.vary[base]
        self.passes.drop_prefix(prefix)
        self.slices.purge_prefix(prefix)
        return count

    def _purge_fills(self, covered: Callable[[str], bool]) -> int:
        """Mark the fills in flight of the covered keys purged: each finishes serving its
        readers and publishes nothing (a later request fetches again). Counts those that were
        to store a new object (a revalidation's object was counted as stored)."""
        count = 0
        for key, fill in self.fills.items():
            if covered(key) and not fill.finished and not fill.purged:
                fill.purged = True
                count += fill.revalidating is None
        return count

    @property
    def fills_running(self) -> int:
        """Fills in flight (whole objects and slices), for the metrics."""
        return len(self.fills)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def open_cache(
    config: Config, upstream: Upstream, clock: Clock = SYSTEM_CLOCK
) -> AsyncIterator[Cache | None]:
    """The cache for the app's lifespan (None when cache_dir is not set); its fills are
    cancelled and awaited when the app stops. `clock`: the time every cache decision reads."""
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
            index.vary[meta.key.rsplit(VARIANT_MARK, 1)[0]] = "accept-encoding"
    cache = Cache(config, upstream, store, index, clock)
    upstream.make_room = cache.make_room
    cache.slices.load(index)
    for victim in index.victims(0):
        cache._evict(victim)
    logger.info("cache: %d objects, %d bytes in %s", len(index), index.stored, config.cache_dir)
    try:
        yield cache
    finally:
        upstream.make_room = None
        await cache.close()
