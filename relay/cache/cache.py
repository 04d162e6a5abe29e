"""The cache: lookups, one fill per key, the budget and eviction, purge, and its lifespan.

Sliced objects are `relay.cache.slices`' (`Cache.slices`); files on disk `relay.cache.store`'s,
written, read and removed on the cache's own threads (`Cache.executor`, `Cache.disk`:
`relay.cache.executor`); checks against known digests `relay.cache.integrity`'s
(`Cache.verifier`, `Cache.scrub`).

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

With several workers (`relay.cache.workers`): misses are led or followed (`Leading`), the index
is a `LedgerIndex`, synced at each lookup; the budget and the eviction order are the ledger's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from relay.cache.bounded import Passes
from relay.cache.clock import SYSTEM_CLOCK, Clock
from relay.cache.executor import DiskExecutor, Ordered
from relay.cache.fill import Fill
from relay.cache.index import Entry, Index
from relay.cache.integrity import Scrub, Verifier, has_known_digest
from relay.cache.key import VARIANT_MARK, path_of, variant_key
from relay.cache.policy import conditional_headers
from relay.cache.slices import Slices
from relay.cache.storable import TOO_LARGE, VARY_LEARNED
from relay.cache.store import Meta, Store
from relay.cache.workers.index import LedgerIndex
from relay.cache.workers.lead import Lead
from relay.cache.workers.leading import Leading, release_when_done
from relay.cache.workers.shared import Shared
from relay.config import SINGLE_PROCESS, Config, Route, WorkerInfo
from relay.errors import StartupError
from relay.net.presets import is_immutable, revalidated
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


@dataclass(slots=True, eq=False)
class FillOrder:
    """What a fill of a whole object is to fetch (`Cache.fill`, `Cache.background_fill`)."""

    base: str
    variant: str
    request: httpx.Request
    """Built from the key alone (`relay.cache.plan.Asked.fill_request`)."""
    route: Route
    revalidating: Entry | None = None
    """The stored object the fill revalidates (its request is then made conditional)."""
    sha256: str | None = None
    """The digest the body must have to be stored (a content-addressed object)."""


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    revalidations: int = 0
    stale: int = 0
    revalidated: int = 0
    expired: int = 0
    coalesced: int = 0
    bytes_from_cache: int = 0
    bytes_zero_copy: int = 0
    bytes_from_upstream: int = 0
    evictions: int = 0
    digest_mismatches: int = 0
    fills_failed: int = 0
    background_stopped: int = 0

    def answered(self, outcome: str) -> None:
        """Count one answer from the cache by its outcome (`relay.cache.plan.Plan.outcome`)."""
        name = _COUNTER[outcome]
        setattr(self, name, getattr(self, name) + 1)


# The counter of each outcome an answer is logged with.
_COUNTER = {
    "hit": "hits",
    "miss": "misses",
    "stale": "stale",
    "revalidated": "revalidated",
    "expired": "expired",
}


class Cache:
    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        store: Store,
        index: Index,
        clock: Clock = SYSTEM_CLOCK,
        executor: DiskExecutor | None = None,
        shared: Shared | None = None,
    ) -> None:
        self.config = config
        self.shared = shared
        """With several workers: this worker's part in the shared cache (`relay.cache.workers`)."""
        self.ledger_index = index if isinstance(index, LedgerIndex) else None
        self.clock = clock
        self.upstream = upstream
        self.store = store
        self.index = index
        self.executor = executor or DiskExecutor()
        """The cache's own threads: every blocking disk job and hash (`relay.cache.executor`)."""
        self.disk = Ordered(self.executor)
        """Jobs on one object's files, in the order they were asked for."""
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
        self.verifier = Verifier(self)
        """Checks of stored objects against their known digest (`relay.cache.integrity`)."""
        self.scrub = Scrub(self, self.verifier, rate=config.cache_verify_rate)
        """The background verification: at startup, and an operator's scrub."""
        self.leading = Leading(shared.locks, store, self.executor) if shared else None
        if self.ledger_index is not None:
            self.ledger_index.remove_files = self.remove_files
            self.ledger_index.learned = self.slices.learned

    # ---- lookups ------------------------------------------------------------------------

    def storage_key(self, base: str, variant: str) -> str:
        vary = self.index.vary
        if vary.get(base) == "accept-encoding":
            vary.move_to_end(base)
            return variant_key(base, variant)
        return base

    def lookup(self, base: str, variant: str) -> Entry | None:
        self.sync()
        return self.index.get(self.storage_key(base, variant))

    def sync(self) -> None:
        """With several workers: learn what the others stored, replaced, evicted, purged."""
        if self.ledger_index is not None:
            self.ledger_index.sync()

    def passing(self, key: str) -> bool:
        return self.passes.active(key)

    @contextlib.contextmanager
    def pinned(self, entry: Entry | None) -> Iterator[None]:
        """Hold the stored version `entry` (when there is one) while answering from it: its
        files stay until the answer is over, even if a newer version replaces it, or it is
        evicted or purged, meanwhile. Pin right at the lookup, before any await."""
        if entry is None:
            yield
            return
        self.index.pin(entry)
        try:
            yield
        finally:
            if self.index.unpin(entry):
                self.remove_files(entry)

    def fill_in_flight(self, base: str, variant: str) -> Fill | None:
        """The fill of this key, if one runs and is not being stopped."""
        fill = self.fills.get(self.storage_key(base, variant))
        return fill if fill is not None and fill.going else None

    # ---- fills --------------------------------------------------------------------------

    def fill(self, order: FillOrder) -> Fill:
        """The fill of the order's key in flight, or a new one (started as a tracked task)."""
        key = self.storage_key(order.base, order.variant)
        current = self.fills.get(key)
        if current is not None and not current.finished:
            return current
        route, revalidating = order.route, order.revalidating
        if revalidating is not None:
            order.request.headers.update(conditional_headers(revalidating.meta.headers))
            self.stats.revalidations += 1
        fill = self.new_fill(key, order.variant, order.request, route, revalidating)
        leading = self.leading if revalidating is None else None  # only misses are led
        lead, leader = leading.take(fill) if leading is not None else (None, None)
        if leading is not None and leader is not None:
            fill = leading.follower(self, fill, leader, order.request, route)
        fill.sha256 = order.sha256
        fill.immutable = is_immutable(route, path_of(order.base, route.prefix))
        fill.revalidate = revalidated(route, path_of(order.base, route.prefix))
        self.start(fill, order.base, lead)
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
            self,
            key=key,
            variant=variant,
            request=request,
            route=route,
            revalidating=revalidating.meta if revalidating is not None else None,
        )

    def start(self, fill: Fill, base: str, lead: Lead | None = None) -> None:
        """Run the fill as a tracked task (`base`: its object's key; `lead`: its fill lock)."""
        self.fills[fill.key] = fill
        task = asyncio.create_task(self._run(fill, base, lead), name=f"cache fill {fill.key[:80]}")
        fill.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        release_when_done(task, self.leading, lead)

    async def _run(self, fill: Fill, base: str, lead: Lead | None = None) -> None:
        try:
            leading = self.leading
            await (fill.run() if lead is None or leading is None else leading.run(fill, lead))
        finally:
            if self.fills.get(fill.key) is fill:
                del self.fills[fill.key]
            if fill.object_key:
                self.slices.finished(fill)
            self.index.reserved -= fill.reserved
            fill.reserved = 0
            self.stats.coalesced += fill.clients.coalesced
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

    def background_fill(self, order: FillOrder) -> Fill | None:
        """The fill of the order's key in flight, or a new one started with no client (a
        prefetch, a revalidation nobody waits for) if there is room for one; None if not (or
        if the fill of this key is being stopped)."""
        current = self.fills.get(self.storage_key(order.base, order.variant))
        if current is not None and not current.finished:
            return current if current.going else None
        if not self.room_for_background():
            return None
        return self.fill(order)

    def room_for_background(self) -> bool:
        return self.background_fills() < self.background_limit

    def background_fills(self) -> int:
        """Fills running with no client waiting."""
        return sum(1 for fill in self.fills.values() if fill.background)

    def fill_lost_clients(self, fill: Fill) -> None:
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
        self._stop(
            min(candidates, key=lambda f: f.clients.idle_since), "its connection went to a client"
        )
        return True

    def _stop(self, fill: Fill, reason: str) -> None:
        fill.stop(reason)
        self.stats.background_stopped += 1

    def count_upstream(self, size: int) -> None:
        self.stats.bytes_from_upstream += size

    def reserve(self, fill: Fill, size: int) -> bool:
        """Make room for `size` more bytes of a fill (beyond those it has written), evicting
        least recently used objects: what they take on disk, its record included."""
        length = fill.written + size
        if length > self.max_object_bytes:
            return False
        more = self.store.reservation(length) - fill.reserved
        if more <= 0:
            return True
        if self.ledger_index is not None:
            # Every worker's budget, in one ledger transaction (relay.cache.workers.index).
            fits, victims = self.ledger_index.reserve(fill.key, more)
            for victim in victims:
                self._evict(victim)
            if fits:
                fill.reserved += more
            return fits
        for victim in self.index.victims(more, keep=fill.key):
            self._evict(victim)
        if self.index.used + more > self.index.max_bytes:
            return False
        fill.reserved += more
        self.index.reserved += more
        return True

    def _retire(self, entry: Entry) -> None:
        """`entry` left the index: its files go now, or when its last reader unpins it."""
        if self.index.retire(entry):
            self.remove_files(entry)

    def _evict(self, entry: Entry) -> None:
        if self.index.peek(entry.key) is entry:
            self.index.remove(entry.key)
        self._retire(entry)
        self.slices.evicted(entry.key)
        self.stats.evictions += 1
        logger.info("cache: evicted %s (%d bytes)", entry.meta.url, entry.size)

    def fill_stored(self, fill: Fill, meta: Meta) -> None:
        """A fill published a new version: it replaces the stored one in the index (whose
        files go once no reader holds them), its cost on disk replaces the reservation."""
        released, fill.reserved = fill.reserved, 0
        data = self.store.published_path(fill.partial)
        entry = Entry(fill.key, data, meta, self.store.cost(meta, data))
        if self.ledger_index is not None:
            # The version and the end of its reservation: one ledger transaction.
            replaced = self.ledger_index.published(entry, released)
        else:
            self.index.reserved -= released
            replaced = self.index.add(entry)
        if replaced is not None:
            self._retire(replaced)
        for victim in self.index.victims(0, keep=fill.key):
            self._evict(victim)
        if fill.object_key:
            self.slices.stored(fill, meta)

    def fill_replaced(self, fill: Fill) -> None:
        """The stored response `fill` revalidates may not be used any more (the upstream
        answered with another version, or its 304 named another one or forbade sharing it):
        dropped at once, so no request is answered from it meanwhile."""
        if fill.object_key:
            self.slices.replaced(fill)
            return
        entry = self.index.peek(fill.key)
        if entry is not None and entry.meta is fill.revalidating:
            self.drop(fill.key)

    def fill_refreshed(self, fill: Fill, meta: Meta) -> None:
        """A 304 refreshed the stored response `fill` revalidated: its entry takes `meta`,
        unless it is gone (purged or evicted: that stands) or another version now."""
        entry = self.index.get(fill.key)
        if entry is None or entry.meta is not fill.revalidating:
            return
        entry.meta = meta
        self.index.recount(entry, self.store.cost(meta, entry.data))
        refreshed = [entry]
        if fill.object_key:
            refreshed += self.slices.refreshed(fill, entry, meta)
        self.rewrite_metas(refreshed)

    # ---- disk jobs ----------------------------------------------------------------------

    def rewrite_metas(self, entries: list[Entry]) -> None:
        """Write the entries' (refreshed) meta to disk, all in one job on the cache's threads,
        after any job already asked for on their files."""
        metas = [(entry.data, entry.meta) for entry in entries]
        self.disk.submit([e.key for e in entries], self.store.rewrite_metas, metas)

    def remove_files(self, entry: Entry) -> None:
        """Remove a retired version's files on the cache's threads: everything dropped in one
        loop iteration (a purge, an eviction run) in one job, after any job already asked for
        on that key's files; a fill of the same key publishes only after it."""
        self.disk.add(self.store.remove_all, entry.key, entry.data)

    def corrupted(self, entries: list[Entry], actual: str, expected: str) -> None:
        """Stored bytes (one object: `entries`, its slices or itself) do not match their
        digest: dropped and counted; answers under way from them abort (`Entry.corrupt`)."""
        for entry in entries:
            entry.corrupt = True
            if self.index.peek(entry.key) is entry:
                self.drop(entry.key)
        self.stats.digest_mismatches += 1
        logger.warning(
            "cache: %s hashes to %s, not its digest %s: dropped",
            entries[0].meta.url,
            actual,
            expected,
        )

    # ---- purge --------------------------------------------------------------------------

    def drop(self, key: str) -> bool:
        entry = self.index.remove(key)
        if entry is None:
            return False
        self._retire(entry)
        return True

    def purge_key(self, base: str) -> int:
        """Drop the object of one URL, every encoding variant, index form and slice included,
        and what is being filled of it; how many objects and fills that was."""

        def covered(key: str) -> bool:
            return key == base or key.startswith(base + "\x00")

        self.sync()  # what other workers stored is purged too
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
        self.sync()  # what other workers stored is purged too
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
        # Removals and rewrites already asked for are finished, not cancelled: a purged
        # object must not come back at the next start.
        await self.disk.drain()


@contextlib.asynccontextmanager
async def open_cache(
    config: Config,
    upstream: Upstream,
    clock: Clock = SYSTEM_CLOCK,
    worker: WorkerInfo = SINGLE_PROCESS,
) -> AsyncIterator[Cache | None]:
    """The cache for the app's lifespan (None when cache_dir is not set); its fills are
    cancelled and awaited when the app stops. `clock`: the time every cache decision reads;
    `worker`: with several, the cache is shared with the other workers (`relay.cache.workers`)."""
    if not config.cache_dir:
        yield None
        return
    root = Path(config.cache_dir)
    store = Store(root)
    executor = DiskExecutor()
    shared = Shared(root) if worker.shared else None
    try:
        try:
            if shared is not None:
                await executor.run(shared.open)
            store.prepare()
            seq = 0
            if shared is None or shared.first:
                loaded = await executor.run(store.load)
            else:
                loaded, seq = await executor.run(shared.load, store)
        except OSError as exc:  # UnfitVolume included
            raise StartupError(f"cache_dir {config.cache_dir!r}: {exc.strerror}") from None
        index: Index
        if shared is not None:
            index = shared.index(config.cache_max_bytes, store, clock.monotonic)
        else:
            index = Index(config.cache_max_bytes, lambda: store.directory_bytes)
        async with _serving(
            config, upstream, store, index, clock, executor, loaded, shared, seq
        ) as cache:
            yield cache
    finally:
        try:
            await asyncio.to_thread(executor.shutdown)
        finally:
            if shared is not None:
                shared.close()


@contextlib.asynccontextmanager
async def _serving(
    config: Config,
    upstream: Upstream,
    store: Store,
    index: Index,
    clock: Clock,
    executor: DiskExecutor,
    loaded: list[tuple[Path, Meta, int]],
    shared: Shared | None = None,
    seq: int = 0,
) -> AsyncIterator[Cache]:
    """`seq`: a worker joining others, the last ledger change `loaded` includes."""
    first = shared is None or shared.first
    ledger_index = index if isinstance(index, LedgerIndex) else None
    for data, meta, cost in loaded:
        entry = Entry(meta.key, data, meta, cost)
        # Bytes with a known digest are not trusted before they are hashed again.
        entry.verified = not has_known_digest(entry)
        (index.add if ledger_index is None else ledger_index.load)(entry)
        if meta.vary == "accept-encoding":
            index.vary[meta.key.rsplit(VARIANT_MARK, 1)[0]] = "accept-encoding"
    if ledger_index is not None and shared is not None:
        shared.loaded(ledger_index, seq)
    cache = Cache(config, upstream, store, index, clock, executor, shared)
    upstream.make_room = cache.make_room
    cache.slices.load(index)
    for victim in index.victims(0):
        cache._evict(victim)
    logger.info(
        "cache: %d objects, %d bytes on disk in %s", len(index), index.on_disk, config.cache_dir
    )
    # Several workers: the first verifies; the others check an object they answer from.
    if first and config.cache_verify_on_start and any(not e.verified for e in index.entries()):
        cache.scrub.start("startup")
    try:
        yield cache
    finally:
        upstream.make_room = None
        await cache.close()
        if ledger_index is not None:
            ledger_index.flush()
