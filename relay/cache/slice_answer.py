"""Answers from slices: a Range of an object not stored whole, or a whole GET of an object that
has slices (after a segmented download), stitched from its aligned slices (stored, or fetched
as they are needed, the next one while this one is sent). Every slice must carry the first
one's validator and total, and a whole answer's last byte waits for the object's digest check
(`relay.cache.slices`): a body of mixed versions or refuted bytes never ends cleanly.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

import httpx

from relay.cache import plan
from relay.cache.delivery import Delivery
from relay.cache.fill import Fill
from relay.cache.holds import Holds
from relay.cache.index import Entry
from relay.cache.policy import answer
from relay.cache.store import Meta

if TYPE_CHECKING:
    from relay.cache.cache import Cache

_SINGLE_RANGE = re.compile(r"bytes=(\d+)-(\d*)", re.IGNORECASE)


class SlicedAnswer:
    """Answers one request from an object's slices (`range` or `whole`); False: the slices
    cannot answer it, the request is to be relayed (or, for `whole`, filled whole)."""

    def __init__(self, cache: Cache, out: Delivery, asked: plan.Asked, holds: Holds) -> None:
        """`holds`: the response's, which holds every slice fill this answer waits on."""
        self._cache = cache
        self._slices = cache.slices
        self._out = out
        self._asked = asked
        self._holds = holds
        self._revalidated = False
        self._stale_status: int | None = None
        self._revalidation: Fill | None = None
        """The conditional request whose answer (a 304, an error) let stored slices answer."""

    async def range(self) -> bool:
        """A Range of an object not stored whole: answered from aligned slices, each stored on
        its own; only missing slices are fetched (Range + If-Range with the first slice's
        validator). A slice of another version aborts the transfer and drops the slices.
        The client's conditionals are answered as for a whole object (`policy.answer`, from
        the slices' validators): If-None-Match / If-Modified-Since a 304, an If-Range that
        does not hold the whole object (as `whole`)."""
        match = _SINGLE_RANGE.fullmatch(
            self._asked.client_headers.get("range", "").replace(" ", "")
        )
        if match is None:
            return False  # suffix or multiple ranges: relayed
        cache = self._cache
        out = self._out
        # Slices not trusted yet (loaded with a known digest): a range waits for their check
        # (what it drops is then fetched again).
        await cache.verifier.sliced(cache.storage_key(self._asked.base, self._asked.variant))
        size = cache.config.cache_slice_bytes
        start = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else None
        if last is not None and last < start:
            return False
        index = start // size
        first = await self._slice(index, None)
        if first is None:
            return False
        source, meta = first
        total = int(meta.extra["total"])
        reply = answer(self._asked.client_headers, httpx.Headers(meta.headers), total)
        if reply.status == 200:
            return await self.whole()  # its If-Range does not hold: the whole object
        report = self._report(source, meta)
        age = plan.age_of(meta, cache.clock.now()) if isinstance(source, Entry) else 0.0
        await out.start(meta, reply, report.cache_status, age, total)
        if reply.status == 206:
            await self._stream(index, first, reply.start, reply.stop)
        else:
            await out.end()  # 304, 416
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
        storage = cache.storage_key(self._asked.base, self._asked.variant)
        if self._asked.method != "GET":
            await cache.verifier.sliced(storage)  # a HEAD waits for their check
            entry = self._slices.entry(self._asked.base, self._asked.variant, 0)
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
        reply = answer(self._asked.client_headers, httpx.Headers(meta.headers), total)
        size = cache.config.cache_slice_bytes
        stored = all(
            self._slices.entry(self._asked.base, self._asked.variant, i) is not None
            for i in range(1, (total + size - 1) // size)
        )
        report = self._report(source, meta, complete=stored)
        age = plan.age_of(meta, cache.clock.now()) if report.outcome != "miss" else 0.0
        await out.start(meta, reply, report.cache_status, age, total)
        if reply.status in (200, 206) and self._asked.method == "GET":
            index = reply.start // size
            current = first if index == 0 else None
            if reply.status == 200:
                # Unverified slices are checked while this is sent; its last byte waits.
                self._slices.verify(storage)
            else:
                await cache.verifier.sliced(storage)
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
                if self._refuted(used, mismatches):
                    # The digest check of the object (its read-ahead slices completed it)
                    # dropped the slices already sent: nothing more to fetch or store.
                    out.abort("the object's slices do not match its digest")
                current = await self._slice(index, validator)
            if current is None or (
                total is not None
                and (current[1].validator != validator or int(current[1].extra["total"]) != total)
            ):
                self._slices.drop(self._asked.base, self._asked.variant)
                out.abort("the object changed between slices")
            source, slice_meta = current
            if total is None:
                validator, total = slice_meta.validator, int(slice_meta.extra["total"])
            offset = index * size
            if offset + size < stop:
                self._read_ahead(index + 1, validator)
            end = min(stop, offset + slice_meta.length)
            if whole and end == stop == total and self._checked(slice_meta, used):
                # The whole object's last byte waits for its digest check (run once every
                # slice is stored): bytes the digest refutes never end cleanly.
                if end - 1 > position:
                    await self._bytes(source, position - offset, end - 1 - offset)
                    position = end - 1
                if isinstance(source, Fill):
                    await source.wait_finished()
                last = cache.index.peek(source.key) or source
                kept = isinstance(last, Entry) and await self._slices.verified(
                    self._asked.base, self._asked.variant, [*used, last]
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
                out.upstream(source)
                stored = cache.index.peek(source.key)
                if stored is not None:
                    used.append(stored)
            position = end
            index += 1
            current = None
        await out.end()

    def _checked(self, meta: Meta, used: list[Entry]) -> bool:
        """Whether a whole answer's last byte waits for a check of the object's slices: its
        whole-object digest, or slices it was made of that were not verified."""
        return "repr-sha256" in meta.extra or any(not e.verified for e in used)

    def _report(self, source: Entry | Fill, meta: Meta, *, complete: bool = True) -> plan.Plan:
        """What the answer is, from where its first slice comes (a hit only if stored, and
        `complete`: no other slice it needs is missing): counted, and its upstream response
        (the slice's fill, or the revalidation that let stored slices answer) reported."""
        out = self._out
        if isinstance(source, Entry) and complete:
            report = plan.from_slices(
                meta,
                self._cache.clock.now(),
                revalidated=self._revalidated,
                stale_status=self._stale_status,
                content_addressed=self._asked.sha256 is not None,
            )
        else:
            report = plan.MISS
        out.answered(report.outcome)
        via = source if isinstance(source, Fill) else self._revalidation
        if via is not None:
            out.upstream(via)
        return report

    def _refuted(self, used: list[Entry], mismatches: int) -> bool:
        """Slices this answer sent are gone, with a digest mismatch counted since it began
        (`mismatches`: the count then): the object's bytes were refuted."""
        cache = self._cache
        return cache.stats.digest_mismatches != mismatches and any(
            cache.index.peek(entry.key) is not entry for entry in used
        )

    def _read_ahead(self, index: int, validator: str | None) -> None:
        """Start the fill of slice `index` (if neither stored nor in flight), as background
        work until this answer reaches it: not when fills without a client are at their
        limit (`_slice` fetches it then)."""
        if (
            self._slices.entry(self._asked.base, self._asked.variant, index) is None
            and self._cache.room_for_background()
        ):
            self._fill(index, validator)

    def _fill(self, index: int, validator: str | None) -> Fill:
        """The fill of slice `index` (in flight, or a new one asking for this version)."""
        return self._slices.fill(
            self._asked.base,
            self._asked.variant,
            index,
            self._asked.fill_request(),
            self._asked.route,
            validator,
            sha256=self._asked.sha256,
        )

    async def _slice(self, index: int, validator: str | None) -> tuple[Entry | Fill, Meta] | None:
        """Slice `index`: stored, or being fetched (None if it cannot be stored)."""
        cache = self._cache
        slices = self._slices
        entry = slices.entry(self._asked.base, self._asked.variant, index)
        if (
            entry is not None
            and validator is None
            and self._asked.sha256 is None  # content-addressed slices are always fresh
            and not plan.freshness_of(entry.meta, cache.clock.now()).fresh
        ):
            # A stale object's slices are revalidated with one conditional request (the
            # Range of this slice with If-None-Match / If-Modified-Since), shared by every
            # client of the object: a 304 refreshes them all; a body drops them all (the
            # answer is then this slice of the new version).
            stale = entry
            revalidation = await self._holds.take(
                lambda: (
                    slices.revalidation(self._asked.base, self._asked.variant)
                    or slices.fill(
                        self._asked.base,
                        self._asked.variant,
                        index,
                        self._asked.fill_request(),
                        self._asked.route,
                        None,
                        revalidating=stale,
                    )
                )
            )
            await revalidation.headers_ready.wait()
            if revalidation.withdrawn:
                return None  # its 304 forbade sharing the object: relayed
            if revalidation.refreshed is not None:
                self._revalidated = True
                self._revalidation = revalidation
                entry = slices.entry(self._asked.base, self._asked.variant, index)
            elif (
                revalidation.key == entry.key
                and revalidation.meta is not None
                and revalidation.failed is None
            ):
                return revalidation, revalidation.meta
            else:
                entry = slices.entry(self._asked.base, self._asked.variant, index)
                if entry is not None:
                    stored = plan.freshness_of(entry.meta, cache.clock.now())
                    if not stored.fresh:
                        # Could not revalidate: stale if the upstream failed and allows it
                        # (as for whole objects), else relayed.
                        failure = revalidation.upstream_failure
                        if not plan.stale_on_error(
                            stored, failure, self._asked.route.cache_stale_if_error
                        ):
                            return None
                        self._stale_status = failure
                        self._revalidation = revalidation
        if entry is not None:
            return entry, entry.meta
        fill = await self._holds.take(lambda: self._fill(index, validator))
        await fill.headers_ready.wait()
        if fill.meta is None or fill.failed is not None:
            entry = slices.entry(self._asked.base, self._asked.variant, index)
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
            fill.clients.attach()
        try:
            entry = source if isinstance(source, Entry) else None
            await self._out.stream(fd, start, stop, fill, end=False, entry=entry)
        finally:
            if fill is not None:
                fill.clients.detach()
            os.close(fd)
