"""Slices: an object fetched and stored as aligned slices of `cache_slice_bytes`, each under
its own key (as nginx's slice module does), so a Range costs the upstream only the slices it
covers that are not stored yet.

`Slices` (one per cache) keeps what the cache knows of sliced objects: the hint of which objects
have slices, the slice fills, the one conditional request refreshing a stale object's slices,
and the check of a complete sliced object against the whole-object SHA-256 its upstream
announced (hashed by `relay.cache.integrity`). `SlicedAnswer` answers one request from slices:
a Range, or a whole GET after a segmented download.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from relay.cache import plan
from relay.cache.fill import Fill
from relay.cache.index import Entry, Index
from relay.cache.integrity import sha256_of_files
from relay.cache.key import SLICE_MARK, path_of, slice_key
from relay.cache.policy import Answer, answer, conditional_headers
from relay.cache.store import Meta
from relay.config import Route
from relay.net.presets import is_immutable

if TYPE_CHECKING:
    from relay.cache.cache import Cache
    from relay.cache.delivery import Delivery

logger = logging.getLogger(__name__)

_SINGLE_RANGE = re.compile(r"bytes=(\d+)-(\d*)", re.IGNORECASE)


class Slices:
    """The cache's sliced objects: hints, slice fills, revalidations, digest checks."""

    def __init__(self, cache: Cache) -> None:
        self._cache = cache
        self.sliced: set[str] = set()
        """Storage keys of objects with stored slices or slice fills started (a hint: a whole
        GET of one is answered from its slices)."""
        self.revalidations: dict[str, Fill] = {}
        """Storage key -> the one conditional request refreshing that object's slices."""
        self.verifying: dict[str, asyncio.Task[None]] = {}
        """Storage key -> the check of a complete sliced object's digest, while it runs."""

    def load(self, index: Index) -> None:
        """The hints of the objects whose slices are stored (at startup)."""
        self.sliced.update(
            entry.key.rsplit(SLICE_MARK, 1)[0]
            for entry in index.entries()
            if SLICE_MARK in entry.key
        )

    # ---- lookups ------------------------------------------------------------------------

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
        return fill if fill is not None and not fill.finished else None

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

    def refreshed(self, fill: Fill, entry: Entry, meta: Meta) -> None:
        """A 304 for one slice (`entry`, refreshed to `meta`) is a 304 for the object: every
        slice of it is fresh again."""
        store = self._cache.store
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
            store.rewrite_meta(other)

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
        self.sliced = {k for k in self.sliced if k != base and not k.startswith(base + "\x00")}

    def purge_prefix(self, prefix: str) -> None:
        self.sliced = {k for k in self.sliced if not k.startswith(prefix)}

    # ---- digests of sliced objects ------------------------------------------------------

    def _verify_when_complete(self, storage: str, meta: Meta) -> None:
        """Once every slice of an object whose upstream announced a whole-object SHA-256 is
        stored (one version), hash them in order off the loop; a mismatch drops them all."""
        cache = self._cache
        expected = meta.extra.get("repr-sha256")
        total = int(meta.extra.get("total", "0"))
        size = cache.config.cache_slice_bytes
        if not expected or total <= 0:
            return
        entries: list[Entry] = []
        for index in range((total + size - 1) // size):
            entry = cache.index.peek(slice_key(storage, index))
            if (
                entry is None
                or entry.meta.validator != meta.validator
                or entry.meta.extra.get("repr-sha256") != expected
            ):
                return
            entries.append(entry)
        task = asyncio.create_task(
            self._verify(storage, entries, expected), name=f"cache verify {storage[:80]}"
        )
        cache.tasks.add(task)
        task.add_done_callback(cache.tasks.discard)
        self.verifying[storage] = task
        task.add_done_callback(
            lambda done: (
                self.verifying.pop(storage, None) if self.verifying.get(storage) is done else None
            )
        )

    async def verified(self, base: str, variant: str, entries: list[Entry]) -> bool:
        """Wait for the digest check of this object's slices, if one runs; whether `entries`
        (the slices an answer was made of) are all still stored (a mismatch drops them)."""
        cache = self._cache
        task = self.verifying.get(cache.storage_key(base, variant))
        if task is not None:
            await asyncio.wait({task})
        return all(cache.index.peek(entry.key) is entry for entry in entries)

    async def _verify(self, storage: str, entries: list[Entry], expected: str) -> None:
        cache = self._cache
        actual = await sha256_of_files([cache.store.data_path(e) for e in entries])
        if actual is None:
            return  # a slice was evicted or purged meanwhile, or relay is stopping
        if actual == expected:
            logger.info("cache: sliced object verified (%s)", entries[0].meta.url)
            return
        if any(cache.index.peek(e.key) is not e for e in entries):
            return  # replaced meanwhile: the new version is judged when it is complete
        cache.stats.digest_mismatches += 1
        self.drop_object(storage)
        logger.warning(
            "cache: slices of %s hash to %s, not the announced %s: dropped",
            entries[0].meta.url,
            actual,
            expected,
        )


class SlicedAnswer:
    """Answers one request from an object's slices (`range` or `whole`); False: the slices
    cannot answer it, the request is to be relayed (or, for `whole`, filled whole)."""

    def __init__(
        self,
        cache: Cache,
        out: Delivery,
        *,
        method: str,
        base: str,
        variant: str,
        route: Route,
        request: Callable[[], httpx.Request],
        client_headers: httpx.Headers,
        sha256: str | None,
    ) -> None:
        self._cache = cache
        self._slices = cache.slices
        self._out = out
        self._method = method
        self._base = base
        self._variant = variant
        self._route = route
        self._build_request = request
        self._client_headers = client_headers
        self._sha256 = sha256
        self._revalidated = False
        self._stale_status: int | None = None

    async def range(self) -> bool:
        """A Range of an object not stored whole: answered from aligned slices, each stored on
        its own; only missing slices are fetched (Range + If-Range with the first slice's
        validator). A slice of another version aborts the transfer and drops the slices."""
        match = _SINGLE_RANGE.fullmatch(self._client_headers.get("range", "").replace(" ", ""))
        if match is None or "if-range" in self._client_headers:
            return False  # suffix, multiple or conditional ranges: relayed
        cache = self._cache
        out = self._out
        size = cache.config.cache_slice_bytes
        start = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else None
        if last is not None and last < start:
            return False
        index = start // size
        first = await self._slice(index, None)
        if first is None:
            return False
        entry_or_fill, meta = first
        total = int(meta.extra["total"])
        if start >= total:
            await out.start(meta, Answer(416), plan.MISS_STORED, 0.0, total)
            await out.end()
            return True
        stop = total if last is None else min(last + 1, total)
        hit = isinstance(entry_or_fill, Entry)
        out.exchange.cache = "hit" if hit else "miss"
        status = self._status(meta) if hit else plan.MISS_STORED
        if hit:
            cache.stats.hits += 1
        else:
            cache.stats.misses += 1
        age = plan.age_of(meta, cache.clock.now())
        await out.start(meta, Answer(206, start, stop), status, age, total)
        await self._stream(index, first, start, stop)
        return True

    async def whole(self) -> bool:
        """A GET or HEAD without Range of an object that has slices (stored, or slice fills
        started): answered from them as one 200 of the whole length, the missing slices
        fetched as for a Range, so a whole GET after a segmented download costs the upstream
        only what the segments did not fetch. False when the slices cannot answer (slice 0
        not storable: the object is then cached whole; larger than cache_max_object_bytes:
        relayed). A HEAD is answered only from a stored, fresh slice 0."""
        cache = self._cache
        out = self._out
        if self._method != "GET":
            entry = self._slices.entry(self._base, self._variant, 0)
            if entry is None or not plan.freshness_of(entry.meta, cache.clock.now()).fresh:
                return False
            first: tuple[Entry | Fill, Meta] | None = (entry, entry.meta)
        else:
            first = await self._slice(0, None)
        if first is None:
            return False
        source, meta = first
        total = int(meta.extra["total"])
        if total > cache.max_object_bytes:
            return False  # too large to store whole: not stored as slices either (relayed)
        reply = answer(self._client_headers, httpx.Headers(meta.headers), total)
        size = cache.config.cache_slice_bytes
        hit = isinstance(source, Entry) and all(
            self._slices.entry(self._base, self._variant, i) is not None
            for i in range(1, (total + size - 1) // size)
        )
        if hit:
            cache.stats.hits += 1
            out.exchange.cache = "hit"
            status = self._status(meta)
        else:
            cache.stats.misses += 1
            out.exchange.cache = "miss"
            status = plan.MISS_STORED
        age = plan.age_of(meta, cache.clock.now()) if hit else 0.0
        await out.start(meta, reply, status, age, total)
        if reply.status in (200, 206) and self._method == "GET":
            index = reply.start // size
            current = first if index == 0 else None
            await self._stream(index, current, reply.start, reply.stop)
        else:
            await out.end()
        return True

    async def _stream(
        self,
        index: int,
        current: tuple[Entry | Fill, Meta] | None,
        position: int,
        stop: int,
    ) -> None:
        """Send bytes [position, stop) of the object from its slices, starting with slice
        `index` (`current`, when already looked up), then end the body. Every slice must
        carry the first one's validator and total: otherwise the transfer is aborted and
        the object's slices dropped. The next slice is fetched while this one is sent."""
        cache = self._cache
        out = self._out
        size = cache.config.cache_slice_bytes
        validator: str | None = None
        total: int | None = None
        whole = position == 0
        used: list[Entry] = []
        mismatches = cache.stats.digest_mismatches
        while position < stop:
            if current is None:
                current = await self._slice(index, validator)
            if current is None or (
                total is not None
                and (current[1].validator != validator or int(current[1].extra["total"]) != total)
            ):
                self._slices.drop(self._base, self._variant)
                out.abort("the object changed between slices")
            source, slice_meta = current
            if total is None:
                validator, total = slice_meta.validator, int(slice_meta.extra["total"])
            offset = index * size
            if offset + size < stop:
                self._read_ahead(index + 1, validator)
            end = min(stop, offset + slice_meta.length)
            if whole and end == stop == total and "repr-sha256" in slice_meta.extra:
                # The whole object's last byte waits for its digest check (run once every
                # slice is stored): bytes the digest refutes never end cleanly.
                if end - 1 > position:
                    await self._bytes(source, position - offset, end - 1 - offset)
                    position = end - 1
                if isinstance(source, Fill):
                    await source.wait_finished()
                last = cache.index.peek(source.key) or source
                kept = isinstance(last, Entry) and await self._slices.verified(
                    self._base, self._variant, [*used, last]
                )
                # Slices gone since this answer began, with a digest mismatch counted: refuted
                # (gone by eviction alone, the bytes read are still the ones stored).
                if not kept and cache.stats.digest_mismatches != mismatches:
                    out.abort("the object's slices do not match its digest")
                source = last
            await self._bytes(source, position - offset, end - offset)
            if isinstance(source, Entry):
                used.append(source)
            else:
                stored = cache.index.peek(source.key)
                if stored is not None:
                    used.append(stored)
            position = end
            index += 1
            current = None
        await out.end()

    def _status(self, meta: Meta) -> str:
        """Cache-Status of an answer from stored slices."""
        return plan.slices_status(
            meta,
            self._cache.clock.now(),
            revalidated=self._revalidated,
            stale_status=self._stale_status,
            content_addressed=self._sha256 is not None,
        )

    def _read_ahead(self, index: int, validator: str | None) -> None:
        """Start the fill of slice `index` (if neither stored nor in flight)."""
        if self._slices.entry(self._base, self._variant, index) is None:
            self._fill(index, validator)

    def _fill(self, index: int, validator: str | None) -> Fill:
        """The fill of slice `index` (in flight, or a new one asking for this version)."""
        return self._slices.fill(
            self._base,
            self._variant,
            index,
            self._build_request(),
            self._route,
            validator,
            sha256=self._sha256,
        )

    async def _slice(self, index: int, validator: str | None) -> tuple[Entry | Fill, Meta] | None:
        """Slice `index`: stored, or being fetched (None if it cannot be stored)."""
        cache = self._cache
        slices = self._slices
        entry = slices.entry(self._base, self._variant, index)
        if (
            entry is not None
            and validator is None
            and self._sha256 is None  # content-addressed slices are always fresh
            and not plan.freshness_of(entry.meta, cache.clock.now()).fresh
        ):
            # A stale object's slices are revalidated with one conditional request (the
            # Range of this slice with If-None-Match / If-Modified-Since), shared by every
            # client of the object: a 304 refreshes them all; a body drops them all (the
            # answer is then this slice of the new version).
            revalidation = slices.revalidation(self._base, self._variant)
            if revalidation is None:
                revalidation = slices.fill(
                    self._base,
                    self._variant,
                    index,
                    self._build_request(),
                    self._route,
                    None,
                    revalidating=entry,
                )
            await revalidation.headers_ready.wait()
            if revalidation.refreshed is not None:
                self._revalidated = True
                entry = slices.entry(self._base, self._variant, index)
            elif (
                revalidation.key == entry.key
                and revalidation.meta is not None
                and revalidation.failed is None
            ):
                return revalidation, revalidation.meta
            else:
                entry = slices.entry(self._base, self._variant, index)
                if entry is not None:
                    stored = plan.freshness_of(entry.meta, cache.clock.now())
                    if not stored.fresh:
                        # Could not revalidate: stale if the upstream failed and allows it
                        # (as for whole objects), else relayed.
                        failure = revalidation.upstream_failure
                        if not plan.stale_on_error(
                            stored, failure, self._route.cache_stale_if_error
                        ):
                            return None
                        cache.stats.stale += 1
                        self._stale_status = failure
        if entry is not None:
            return entry, entry.meta
        fill = self._fill(index, validator)
        await fill.headers_ready.wait()
        if fill.meta is None or fill.failed is not None:
            entry = slices.entry(self._base, self._variant, index)
            return (entry, entry.meta) if entry is not None else None
        return fill, fill.meta

    async def _bytes(self, source: Entry | Fill, start: int, stop: int) -> None:
        """Send bytes [start, stop) of one slice (stored, or from its fill as it advances)."""
        cache = self._cache
        path = cache.store.data_path(source) if isinstance(source, Entry) else source.partial
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if isinstance(source, Fill):
                await source.wait_finished()
                entry = cache.index.get(source.key)
                if entry is not None:
                    await self._bytes(entry, start, stop)
                    return
            self._out.abort("a slice went away")
        fill = source if isinstance(source, Fill) and not source.published else None
        if fill is not None:
            fill.attach()
        try:
            await self._out.stream(fd, start, stop, fill, end=False)
        finally:
            if fill is not None:
                fill.detach()
            os.close(fd)
