"""Slices: an object fetched and stored as aligned slices of `cache_slice_bytes`, each under
its own key (as nginx's slice module does), so a Range costs the upstream only the slices it
covers that are not stored yet.

`Slices` (one per cache) keeps what the cache knows of sliced objects: the hint of which objects
have slices, the slice fills, the one conditional request refreshing a stale object's slices,
and the check of a complete sliced object against the whole-object SHA-256 its upstream
announced (hashed by `relay.cache.integrity`). Answering a request from slices is
`relay.cache.slice_answer`'s.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING

import httpx

from relay.cache.bounded import LruSet, hints_bound
from relay.cache.fill import Fill
from relay.cache.index import Entry, Index
from relay.cache.key import SLICE_MARK, path_of, slice_key
from relay.cache.policy import conditional_headers
from relay.cache.store import Meta
from relay.config import Route
from relay.net.presets import is_immutable, revalidated

if TYPE_CHECKING:
    from relay.cache.cache import Cache

logger = logging.getLogger(__name__)


class Slices:
    """The cache's sliced objects: hints, slice fills, revalidations, digest checks."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self.sliced = LruSet(hints_bound(cache.config.cache_max_bytes))
        """Storage keys of objects with stored slices or slice fills started (a hint: a whole
        GET of one is answered from its slices). Bounded (keyed by client input): a lost hint
        makes a whole GET of that object a whole fill."""
        self.revalidations: dict[str, Fill] = {}
        """Storage key -> the one conditional request refreshing that object's slices."""
        self.unverified: set[str] = set()
        """Storage keys of objects that may have unverified slices (loaded with a known
        digest, or complete and not yet checked against the whole-object digest): a hint
        that spares answers a scan of the index; `relay.cache.integrity` prunes it."""

    def load(self, index: Index) -> None:
        """The hints of the objects whose slices are stored (at startup)."""
        for entry in index.entries():
            if SLICE_MARK in entry.key:
                storage = entry.key.rsplit(SLICE_MARK, 1)[0]
                self.sliced.add(storage)
                if not entry.verified:
                    self.unverified.add(storage)

    # ---- lookups ------------------------------------------------------------------------

    def learned(self, entry: Entry) -> None:
        """Another worker stored `entry` (several workers): its object's hint, as `load`."""
        if SLICE_MARK in entry.key:
            storage = entry.key.rsplit(SLICE_MARK, 1)[0]
            self.sliced.add(storage)
            if not entry.verified:
                self.unverified.add(storage)

    def has(self, base: str, variant: str) -> bool:
        return self._cache.storage_key(base, variant) in self.sliced

    def entry(self, base: str, variant: str, index: int) -> Entry | None:
        return self._cache.index.get(slice_key(self._cache.storage_key(base, variant), index))

    def of(self, storage: str) -> list[Entry]:
        index = self._cache.index
        prefix = slice_key(storage, "")
        return [e for k in index.keys_with_prefix(prefix) if (e := index.peek(k))]

    def revalidation(self, base: str, variant: str) -> Fill | None:
        """The conditional request refreshing this object's slices, if one is in flight."""
        fill = self.revalidations.get(self._cache.storage_key(base, variant))
        return fill if fill is not None and fill.going else None

    # ---- fills --------------------------------------------------------------------------

    def fill(
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
        cache = self._cache
        storage = cache.storage_key(base, variant)
        key = slice_key(storage, index)
        current = cache.fills.get(key)
        if current is not None and not current.finished:
            return current
        size = cache.config.cache_slice_bytes
        first = index * size
        request.headers["range"] = f"bytes={first}-{first + size - 1}"
        if revalidating is not None:
            request.headers.update(conditional_headers(revalidating.meta.headers))
            cache.stats.revalidations += 1
        elif validator is not None:
            request.headers["if-range"] = validator
        fill = cache.new_fill(key, variant, request, route, revalidating)
        fill.slice = (first, first + size - 1, validator)
        fill.sha256 = sha256
        fill.immutable = is_immutable(route, path_of(base, route.prefix))
        fill.revalidate = revalidated(route, path_of(base, route.prefix))
        fill.object_key = storage
        self.sliced.add(storage)
        if revalidating is not None:
            self.revalidations[storage] = fill
        cache.start(fill, base)
        return fill

    def stored(self, fill: Fill, meta: Meta) -> None:
        """A slice fill was published."""
        self.sliced.add(fill.object_key)
        self._verify_when_complete(fill.object_key, meta)

    def refreshed(self, fill: Fill, entry: Entry, meta: Meta) -> list[Entry]:
        """A 304 for one slice (`entry`, refreshed to `meta`) is a 304 for the object: every
        slice of it is fresh again. The other slices refreshed (their meta is written to disk
        by the caller, all in one job)."""
        refreshed = []
        for other in self.of(fill.object_key):
            if other is entry or other.meta.validator != meta.validator:
                continue
            other.meta = dataclasses.replace(
                other.meta,
                headers=meta.headers,
                stored_at=meta.stored_at,
                initial_age=meta.initial_age,
                lifetime=meta.lifetime,
            )
            self._cache.index.recount(other, self._cache.store.cost(other.meta, other.data))
            refreshed.append(other)
        return refreshed

    def replaced(self, fill: Fill) -> None:
        """A conditional request for a stale slice was answered with a body: the object's
        stored slices are another version (or no longer to be trusted): all dropped."""
        if fill.object_key:
            dropped = self.drop_object(fill.object_key)
            logger.info("cache: %d stale slices replaced (%s)", dropped, fill.object_key[:80])

    def finished(self, fill: Fill) -> None:
        """A slice fill is over (whatever its outcome)."""
        storage = fill.object_key
        if self.revalidations.get(storage) is fill:
            del self.revalidations[storage]
        if fill.passthrough is not None and not self.of(storage):
            # No slice stored (no byte ranges, say): whole GETs are not sent to slices.
            self.sliced.discard(storage)

    # ---- dropping -----------------------------------------------------------------------

    def drop(self, base: str, variant: str) -> int:
        return self.drop_object(self._cache.storage_key(base, variant))

    def drop_object(self, storage: str) -> int:
        self.sliced.discard(storage)
        prefix = slice_key(storage, "")
        cache = self._cache
        return sum(cache.drop(key) for key in cache.index.keys_with_prefix(prefix))

    def evicted(self, key: str) -> None:
        if SLICE_MARK in key:
            # The hint goes with the object's first evicted slice (a whole GET then fills the
            # object whole; a slice stored later adds it back), so it stays bounded by what
            # the cache holds.
            self.sliced.discard(key.rpartition(SLICE_MARK)[0])

    def purge_key(self, base: str) -> None:
        for key in self.sliced:
            if key == base or key.startswith(base + "\x00"):
                self.sliced.discard(key)

    def purge_prefix(self, prefix: str) -> None:
        for key in self.sliced:
            if key.startswith(prefix):
                self.sliced.discard(key)

    # ---- digests of sliced objects ------------------------------------------------------

    def complete(self, storage: str) -> list[Entry] | None:
        """Every slice of the object, in order, if all are stored as one version carrying a
        whole-object SHA-256 (`extra["repr-sha256"]`); else None."""
        cache = self._cache
        first = cache.index.peek(slice_key(storage, 0))
        if first is None:
            return None
        expected = first.meta.extra.get("repr-sha256")
        total = int(first.meta.extra.get("total", "0"))
        size = cache.config.cache_slice_bytes
        if not expected or total <= 0:
            return None
        entries: list[Entry] = []
        for index in range((total + size - 1) // size):
            entry = cache.index.peek(slice_key(storage, index))
            if (
                entry is None
                or entry.meta.validator != first.meta.validator
                or entry.meta.extra.get("repr-sha256") != expected
            ):
                return None
            entries.append(entry)
        return entries

    def _verify_when_complete(self, storage: str, meta: Meta) -> None:
        """Once every slice of an object whose upstream announced a whole-object SHA-256 is
        stored (one version), they are unverified until hashed in order (started now, off the
        loop); a mismatch drops them all."""
        complete = self.complete(storage)
        if complete is None or complete[-1].meta.validator != meta.validator:
            return
        for entry in complete:
            entry.verified = False
        self.unverified.add(storage)
        self.verify(storage)

    def verify(self, storage: str) -> None:
        """Start the check of the object's unverified slices (if any, and none runs)."""
        if storage in self.unverified:
            task = asyncio.create_task(
                self._cache.verifier.sliced(storage), name=f"cache verify {storage[:80]}"
            )
            cache = self._cache
            cache.tasks.add(task)
            task.add_done_callback(cache.tasks.discard)

    async def verified(self, base: str, variant: str, entries: list[Entry]) -> bool:
        """Wait for the check of this object's unverified slices (joined, or started);
        whether `entries` (the slices an answer was made of) are all still stored (a mismatch
        drops them)."""
        cache = self._cache
        await cache.verifier.sliced(cache.storage_key(base, variant))
        return all(cache.index.peek(entry.key) is entry for entry in entries)
