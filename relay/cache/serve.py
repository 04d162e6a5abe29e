"""The response of a cached route: a hit streamed from the object's file, or a miss streamed
from the fill's file as the fill advances (every attached client from the first byte).

A complete object (a hit, a range of one, a stored slice) of more than `INLINE_READ` bytes goes
out zero-copy when the server offers the ASGI Zero Copy Send extension (relay's own protocol
does on plain TCP: relay/server/zerocopy.py): `sendfile` from the file to the socket, `CHUNK`
bytes per message (`FAST_CHUNK` once the client proves fast), each under `send_timeout`;
nothing is read into Python. A smaller body is read on the loop and leaves with its head in one
write, cheaper than a head write and a sendfile. Elsewhere (another server, TLS) and for a body
still being filled (it waits on the fill), reads are `os.pread` of the same sizes in the
default executor: a slow client holds one small chunk, and waits on the server's back-pressure
before the next read.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import httpx
from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.fill import Fill
from relay.cache.index import Entry
from relay.cache.policy import Answer, answer, cache_status, freshness
from relay.cache.store import DATA, Meta
from relay.config import Route
from relay.errors import TransferAborted, error_response
from relay.proxy.admission import StreamLimiter
from relay.proxy.exchange import Exchange, exchange_of
from relay.proxy.pacing import ReadPacer
from relay.proxy.send_watch import ClientWatch
from relay.proxy.streaming import RESET_KEY, WAIT_FOR_CLIENT
from relay.types import ZERO_COPY_SEND, RawHeaders, Receive, Scope, Send

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
# A client that takes bytes faster than pacing.FAST_RATE gets reads of this size instead: as
# for relayed streams, a slow client holds one small chunk, a fast one costs few reads per GiB.
FAST_CHUNK = 1024 * 1024
# Reads up to this size are made on the loop: a thread hop costs more than reading a few KiB
# of a recently written file, and small objects are most of a hit rate.
INLINE_READ = 16 * 1024
# Headers a 304 carries from the stored response (RFC 9110 15.4.5).
_NOT_MODIFIED_HEADERS = frozenset(
    {"cache-control", "content-location", "etag", "expires", "vary", "last-modified", "via"}
)


# Client headers that make a stored 200 answer something other than the whole object.
_SHAPING = ("range", "if-none-match", "if-modified-since")


@dataclass(slots=True)
class _Parsed:
    """What every hit of one stored response needs, derived once from its Meta (kept on the
    index Entry; a refreshed or replaced Meta is parsed again)."""

    meta: Meta
    headers: httpx.Headers
    must_revalidate: bool
    head: list[tuple[bytes, bytes]]
    """The stored headers encoded for a 200 or 206 (Accept-Ranges added where it belongs);
    Content-Range, Content-Length, Age and Cache-Status are added per answer."""
    data: str
    """The object's data file."""


def _parsed(entry: Entry) -> _Parsed:
    parsed = entry.parsed
    meta = entry.meta
    if isinstance(parsed, _Parsed) and parsed.meta is meta:
        return parsed
    headers = httpx.Headers(meta.headers)
    head = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in meta.headers]
    if (meta.complete or meta.validator is not None) and not any(
        n == b"accept-ranges" for n, _ in head
    ):
        head.append((b"accept-ranges", b"bytes"))
    parsed = _Parsed(
        meta,
        headers,
        freshness(headers, 0.0, meta.lifetime).must_revalidate,
        head,
        os.fspath(entry.directory / DATA),
    )
    entry.parsed = parsed
    return parsed


_SINGLE_RANGE = re.compile(r"bytes=(\d+)-(\d*)", re.IGNORECASE)
_MISS_STORED = "relay; fwd=miss; stored"


class _ClientGone(Exception):
    pass


class CachedResponse(Response):
    """Answers a GET or HEAD of a cached route. `fallback` builds the relayed response used
    when the cache does not take the request (not storable, a cold range, HEAD of a miss)."""

    def __init__(
        self,
        cache: Cache,
        *,
        method: str,
        base: str,
        variant: str,
        route: Route,
        request: Callable[[], httpx.Request],
        client_headers: httpx.Headers,
        fallback: Callable[[], Response],
        limiter: StreamLimiter,
        client: str | None,
        send_timeout: float,
        sha256: str | None = None,
        adapt: Callable[[RawHeaders], RawHeaders] | None = None,
    ) -> None:
        """`sha256`: the object is content-addressed (`base` names its digest): a stored copy
        is always fresh (the digest is the validator, checked by whoever chose the key), and a
        fill is stored only if its body has that digest. `adapt`: applied to every answer's
        headers taken from the stored response."""
        self._cache = cache
        self._sha256 = sha256
        self._adapt = adapt
        self._method = method
        self._base = base
        self._variant = variant
        self._route = route
        self._build_request = request
        self._client_headers = client_headers
        self._fallback = fallback
        self._limiter = limiter
        self._client = client
        self._send_timeout = send_timeout
        self._exchange = Exchange()
        self._held: list[Fill] = []
        self.status_code = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._exchange = exchange_of(scope)
        self._scope_reset = scope.get(RESET_KEY)
        self._zero_copy = ZERO_COPY_SEND in (scope.get("extensions") or ())
        refusal = self._limiter.acquire(self._client)
        if refusal is not None:
            self._exchange.outcome = "rejected"
            await error_response(refusal)(scope, receive, send)
            return
        relayed: Response | None = None
        try:
            try:
                # Its only wait is the server's send (the socket draining the previous
                # answer): bounded as every send of a hit is.
                async with asyncio.timeout(self._send_timeout):
                    small = await self._small_hit(send)
            except TimeoutError:
                self._exchange.outcome = "client_abort"
                self._reset()
                raise TransferAborted("client stopped reading") from None
            if small:
                return
            task = asyncio.current_task()
            assert task is not None
            watch = ClientWatch(receive, task)
            try:
                relayed = await self._answer(scope, send)
            except asyncio.CancelledError:
                if not watch.gone:
                    raise
                task.uncancel()
                self._exchange.outcome = "client_abort"
            finally:
                watch.stop()
        except (OSError, _ClientGone):
            self._exchange.outcome = "client_abort"
        finally:
            for fill in self._held:
                fill.release()
            self._limiter.release(self._client)
        if relayed is not None:
            # Relayed outside this response's slot: the relayed response takes its own.
            if self._exchange.cache == "-":
                self._exchange.cache = "pass"
            await relayed(scope, receive, send)

    async def _small_hit(self, send: Send) -> bool:
        """A fresh hit whose body (if any) is at most `INLINE_READ` bytes: read on the loop
        and sent with the head in one message. Nothing in it waits on anything but the
        server's send, so it needs no disconnect watcher (the watcher could only run once the
        answer is out) and no back-pressure wait: what is sent is all there is. Anything
        else (stale, a fill, a bigger body) is left to `_answer`; False then."""
        method = self._method
        if (method != "GET" and method != "HEAD") or self._sha256 is not None:
            # A content-addressed object's answers carry this request's adapted headers and
            # no ttl: `_answer` makes them.
            return False
        entry = self._cache.lookup(self._base, self._variant)
        if entry is None:
            return False
        parsed = _parsed(entry)
        meta = parsed.meta
        age = _age(meta)
        if parsed.must_revalidate or age >= meta.lifetime:
            return False
        client_headers = self._client_headers
        length = meta.length
        if any(name in client_headers for name in _SHAPING):
            reply = answer(client_headers, parsed.headers, length)
        else:
            reply = Answer(200, 0, length)
        body = b""
        if method == "GET" and reply.status in (200, 206):
            want = reply.stop - reply.start
            if want > INLINE_READ:
                return False
            if want:
                try:
                    fd = os.open(parsed.data, os.O_RDONLY)
                except OSError:
                    fd = -1
                if fd >= 0:
                    try:
                        body = os.pread(fd, want, reply.start)
                    finally:
                        os.close(fd)
                if len(body) != want:
                    # Gone or cut short by an outside hand (eviction and purge run on this
                    # loop): say so rather than guess.
                    self._cache.index.remove(entry.key)
                    await self._send_error(send, 503, "cached object unavailable, retry")
                    return True
        cache = self._cache
        cache.stats.hits += 1
        cache.stats.bytes_from_cache += len(body)
        self._exchange.cache = "hit"
        status = cache_status(hit=True, ttl=meta.lifetime - age)
        if reply.status not in (200, 206):
            await self._start(send, meta, reply, status, age, length)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return True
        headers = parsed.head.copy()
        if reply.status == 206:
            headers.append(
                (b"content-range", f"bytes {reply.start}-{reply.stop - 1}/{length}".encode())
            )
        headers.append((b"content-length", str(reply.stop - reply.start).encode()))
        headers.append((b"age", str(int(age)).encode()))
        headers.append((b"cache-status", status.encode()))
        self.status_code = reply.status
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        self._exchange.bytes_sent = len(body)
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True

    async def _answer(self, scope: Scope, send: Send) -> Response | None:
        cache = self._cache
        entry = cache.lookup(self._base, self._variant)
        if entry is not None and self._sha256 is not None and entry.meta.sha256 != self._sha256:
            cache.drop(entry.key)  # never expected: stored only once verified against its key
            entry = None
        if entry is not None:
            fresh = freshness(
                httpx.Headers(entry.meta.headers), _age(entry.meta), entry.meta.lifetime
            )
            if fresh.fresh or self._sha256 is not None:
                cache.stats.hits += 1
                self._exchange.cache = "hit"
                ttl = _ttl(entry.meta) if self._sha256 is None else None
                await self._from_file(send, entry, cache_status(hit=True, ttl=ttl))
                return None
            if fresh.may_serve_stale_while_revalidating():
                # Nobody waits for this revalidation: not started when fills without a client
                # are at their limit (the next request tries again).
                cache.background_fill(
                    self._base, self._variant, self._build_request(), self._route, entry
                )
                cache.stats.stale += 1
                self._exchange.cache = "stale"
                status = cache_status(hit=True, fwd="stale", detail="stale-while-revalidate")
                await self._from_file(send, entry, status)
                return None
            fill = await self._use(
                lambda: cache.fill(
                    self._base, self._variant, self._build_request(), self._route, entry
                )
            )
            await fill.headers_ready.wait()
            if fill.refreshed is not None:
                refreshed = cache.lookup(self._base, self._variant) or entry
                refreshed.meta = fill.refreshed
                self._exchange.cache = "revalidated"
                status = cache_status(hit=False, fwd="stale", fwd_status=304)
                await self._from_file(send, refreshed, status)
                return None
            failing = fill.error is not None or (fill.upstream_status or 0) >= 500
            if failing and fresh.may_serve_stale_on_error(self._route.cache_stale_if_error):
                cache.stats.stale += 1
                self._exchange.cache = "stale"
                status = cache_status(
                    hit=True,
                    fwd="stale",
                    fwd_status=fill.error.status_code if fill.error else fill.upstream_status,
                    detail="stale-if-error",
                )
                await self._from_file(send, entry, status)
                return None
            return await self._from_fill(send, fill, cache_status(hit=False, fwd="stale"))
        fill_now = cache.fill_in_flight(self._base, self._variant)
        if fill_now is None:
            if self._method == "GET" and "range" in self._client_headers:
                return await self._from_slices(send)
            if cache.passing(cache.storage_key(self._base, self._variant)):
                return self._fallback()
            if cache.has_slices(self._base, self._variant) and await self._whole_from_slices(send):
                return None
            if self._method != "GET":
                return self._fallback()
        cache.stats.misses += 1
        fill = await self._use(
            lambda: cache.fill(
                self._base, self._variant, self._build_request(), self._route, sha256=self._sha256
            )
        )
        return await self._from_fill(send, fill, cache_status(hit=False, fwd="miss"))

    # ---- answers ------------------------------------------------------------------------

    async def _from_file(self, send: Send, entry: Entry, status: str) -> None:
        meta = entry.meta
        try:
            fd = os.open(entry.directory / DATA, os.O_RDONLY)
        except OSError:
            # Evicted or purged between the lookup and here (both run on this loop, so only
            # an outside hand can do this): say so rather than guess.
            self._cache.index.remove(entry.key)
            await self._send_error(send, 503, "cached object unavailable, retry")
            return
        try:
            reply = answer(self._client_headers, httpx.Headers(meta.headers), meta.length)
            await self._start(send, meta, reply, status, _age(meta), meta.length)
            if reply.status in (200, 206) and self._method == "GET":
                await self._stream(send, fd, reply.start, reply.stop, None)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            os.close(fd)

    async def _from_fill(self, send: Send, fill: Fill, status: str) -> Response | None:
        await fill.headers_ready.wait()
        if fill.error is not None:
            self._exchange.outcome = "upstream_error"
            failure = error_response(fill.error)
            self.status_code = failure.status_code
            await send(
                {
                    "type": "http.response.start",
                    "status": failure.status_code,
                    "headers": failure.raw_headers,
                }
            )
            await send({"type": "http.response.body", "body": failure.body, "more_body": False})
            return None
        meta = fill.meta
        if (
            meta is None
            or fill.failed is not None
            or (meta.vary and meta.extra.get("variant") != self._variant)
        ):
            return self._fallback()
        try:
            fd = os.open(fill.partial, os.O_RDONLY)
        except FileNotFoundError:
            # Published (renamed) in between: read the stored object.
            await fill.wait_finished()
            entry = self._cache.index.get(fill.key)
            if entry is None:
                return self._fallback()
            await self._from_file(send, entry, status + "; stored")
            return None
        self._exchange.cache = "miss"
        fill.attach()
        try:
            if fill.length is None:
                plan = Answer(200, 0, -1)
            else:
                plan = answer(self._client_headers, httpx.Headers(meta.headers), fill.length)
            await self._start(send, meta, plan, status + "; stored", 0.0, fill.length or 0)
            if plan.status in (200, 206) and self._method == "GET":
                await self._stream(send, fd, plan.start, plan.stop, fill)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            fill.detach()
            os.close(fd)
        return None

    async def _from_slices(self, send: Send) -> Response | None:
        """A Range of an object not stored whole: answered from aligned slices, each stored on
        its own; only missing slices are fetched (Range + If-Range with the first slice's
        validator). A slice of another version aborts the transfer and drops the slices."""
        match = _SINGLE_RANGE.fullmatch(self._client_headers.get("range", "").replace(" ", ""))
        if match is None or "if-range" in self._client_headers:
            return self._fallback()  # suffix, multiple or conditional ranges: relayed
        cache = self._cache
        size = cache.config.cache_slice_bytes
        start = int(match.group(1))
        last = int(match.group(2)) if match.group(2) else None
        if last is not None and last < start:
            return self._fallback()
        index = start // size
        first = await self._slice(index, None)
        if first is None:
            return self._fallback()
        entry_or_fill, meta = first
        total = int(meta.extra["total"])
        if start >= total:
            await self._start(send, meta, Answer(416), _MISS_STORED, 0.0, total)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return None
        stop = total if last is None else min(last + 1, total)
        hit = isinstance(entry_or_fill, Entry)
        self._exchange.cache = "hit" if hit else "miss"
        status = self._slices_status(meta) if hit else _MISS_STORED
        if hit:
            cache.stats.hits += 1
        else:
            cache.stats.misses += 1
        await self._start(send, meta, Answer(206, start, stop), status, _age(meta), total)
        await self._stream_slices(send, index, first, start, stop)
        return None

    async def _whole_from_slices(self, send: Send) -> bool:
        """A GET or HEAD without Range of an object that has slices (stored, or slice fills
        started): answered from them as one 200 of the whole length, the missing slices
        fetched as for a Range, so a whole GET after a segmented download costs the upstream
        only what the segments did not fetch. False when the slices cannot answer (slice 0
        not storable: the object is then cached whole; larger than cache_max_object_bytes:
        relayed). A HEAD is answered only from a stored, fresh slice 0."""
        cache = self._cache
        if self._method != "GET":
            entry = cache.slice_entry(self._base, self._variant, 0)
            if entry is None or not _fresh(entry.meta):
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
            cache.slice_entry(self._base, self._variant, i) is not None
            for i in range(1, (total + size - 1) // size)
        )
        if hit:
            cache.stats.hits += 1
            self._exchange.cache = "hit"
            status = self._slices_status(meta)
        else:
            cache.stats.misses += 1
            self._exchange.cache = "miss"
            status = _MISS_STORED
        await self._start(send, meta, reply, status, _age(meta) if hit else 0.0, total)
        if reply.status in (200, 206) and self._method == "GET":
            index = reply.start // size
            current = first if index == 0 else None
            await self._stream_slices(send, index, current, reply.start, reply.stop)
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        return True

    async def _stream_slices(
        self,
        send: Send,
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
                cache.drop_slices(self._base, self._variant)
                self._abort("the object changed between slices")
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
                    await self._slice_bytes(send, source, position - offset, end - 1 - offset)
                    position = end - 1
                if isinstance(source, Fill):
                    await source.wait_finished()
                last = cache.index.peek(source.key) or source
                kept = isinstance(last, Entry) and await cache.slices_verified(
                    self._base, self._variant, [*used, last]
                )
                # Slices gone since this answer began, with a digest mismatch counted: refuted
                # (gone by eviction alone, the bytes read are still the ones stored).
                if not kept and cache.stats.digest_mismatches != mismatches:
                    self._abort("the object's slices do not match its digest")
                source = last
            await self._slice_bytes(send, source, position - offset, end - offset)
            if isinstance(source, Entry):
                used.append(source)
            else:
                stored = cache.index.peek(source.key)
                if stored is not None:
                    used.append(stored)
            position = end
            index += 1
            current = None
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _slices_status(self, meta: Meta) -> str:
        """Cache-Status of an answer from stored slices."""
        if self._revalidated:
            return cache_status(hit=False, fwd="stale", fwd_status=304)
        if self._stale_status is not None:
            return cache_status(
                hit=True, fwd="stale", fwd_status=self._stale_status, detail="stale-if-error"
            )
        # A content-addressed object's slices never go stale: no ttl to tell.
        return cache_status(hit=True, ttl=_ttl(meta) if self._sha256 is None else None)

    def _read_ahead(self, index: int, validator: str | None) -> None:
        """Start the fill of slice `index` (if neither stored nor in flight), as background
        work until this response reaches it: not when fills without a client are at their
        limit."""
        cache = self._cache
        if (
            cache.slice_entry(self._base, self._variant, index) is None
            and cache.room_for_background()
        ):
            self._slice_fill(index, validator)

    def _slice_fill(self, index: int, validator: str | None) -> Fill:
        """The fill of slice `index` (in flight, or a new one asking for this version)."""
        return self._cache.slice_fill(
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
        entry = cache.slice_entry(self._base, self._variant, index)
        if (
            entry is not None
            and validator is None
            and self._sha256 is None  # content-addressed slices are always fresh
            and not _fresh(entry.meta)
        ):
            # A stale object's slices are revalidated with one conditional request (the
            # Range of this slice with If-None-Match / If-Modified-Since), shared by every
            # client of the object: a 304 refreshes them all; a body drops them all (the
            # answer is then this slice of the new version).
            revalidation = await self._use(
                lambda: (
                    cache.slice_revalidation(self._base, self._variant)
                    or cache.slice_fill(
                        self._base,
                        self._variant,
                        index,
                        self._build_request(),
                        self._route,
                        None,
                        revalidating=entry,
                    )
                )
            )
            await revalidation.headers_ready.wait()
            if revalidation.refreshed is not None:
                self._revalidated = True
                entry = cache.slice_entry(self._base, self._variant, index)
            elif (
                revalidation.key == entry.key
                and revalidation.meta is not None
                and revalidation.failed is None
            ):
                return revalidation, revalidation.meta
            else:
                entry = cache.slice_entry(self._base, self._variant, index)
                if entry is not None and not _fresh(entry.meta):
                    # Could not revalidate: stale if the upstream failed and allows it (as
                    # for whole objects), else relayed.
                    failing = revalidation.error is not None or (
                        (revalidation.upstream_status or 0) >= 500
                    )
                    meta = entry.meta
                    stale = freshness(httpx.Headers(meta.headers), _age(meta), meta.lifetime)
                    if not failing or not stale.may_serve_stale_on_error(
                        self._route.cache_stale_if_error
                    ):
                        return None
                    cache.stats.stale += 1
                    self._stale_status = (
                        revalidation.error.status_code
                        if revalidation.error is not None
                        else revalidation.upstream_status
                    )
        if entry is not None:
            return entry, entry.meta
        fill = await self._use(lambda: self._slice_fill(index, validator))
        await fill.headers_ready.wait()
        if fill.meta is None or fill.failed is not None:
            entry = cache.slice_entry(self._base, self._variant, index)
            return (entry, entry.meta) if entry is not None else None
        return fill, fill.meta

    async def _use(self, get: Callable[[], Fill]) -> Fill:
        """The fill `get` gives (in flight, or a new one), held until this response ends: a
        fill a client waits for or reads is not background work (the cache neither stops it
        nor counts it as such). One the cache stopped just as this client came (nothing of it
        will be published) is waited out, and the one that follows it taken instead."""
        fill = get()
        while fill.stopping is not None and fill.task is not None and not fill.task.done():
            await asyncio.wait({fill.task})
            fill = get()
        fill.hold()
        self._held.append(fill)
        return fill

    async def _slice_bytes(self, send: Send, source: Entry | Fill, start: int, stop: int) -> None:
        path = source.directory / DATA if isinstance(source, Entry) else source.partial
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            if isinstance(source, Fill):
                await source.wait_finished()
                entry = self._cache.index.get(source.key)
                if entry is not None:
                    await self._slice_bytes(send, entry, start, stop)
                    return
            self._abort("a slice went away")
        fill = source if isinstance(source, Fill) and not source.published else None
        if fill is not None:
            fill.attach()
        try:
            await self._stream(send, fd, start, stop, fill, end=False)
        finally:
            if fill is not None:
                fill.detach()
            os.close(fd)

    async def _start(
        self, send: Send, meta: Meta, reply: Answer, status: str, age: float, total: int
    ) -> None:
        headers: list[tuple[bytes, bytes]] = []
        for name, value in meta.headers:
            lower = name.lower()
            if reply.status == 304 and lower not in _NOT_MODIFIED_HEADERS:
                continue
            headers.append((lower.encode("latin-1"), value.encode("latin-1")))
        if (
            reply.status in (200, 206, 416)
            and (meta.complete or meta.validator is not None)
            and not any(n == b"accept-ranges" for n, _ in headers)
        ):
            headers.append((b"accept-ranges", b"bytes"))
        if reply.status == 206:
            headers.append(
                (b"content-range", f"bytes {reply.start}-{reply.stop - 1}/{total}".encode())
            )
        if reply.status == 416:
            headers = [
                (n, v) for n, v in headers if n not in (b"content-type", b"content-encoding")
            ]
            headers.append((b"content-range", f"bytes */{total}".encode()))
            headers.append((b"content-length", b"0"))
        elif reply.status in (200, 206) and reply.stop >= 0:
            headers.append((b"content-length", str(reply.stop - reply.start).encode()))
        if self._adapt is not None:
            headers = self._adapt(headers)
        headers.append((b"age", str(int(age)).encode()))
        headers.append((b"cache-status", status.encode()))
        self.status_code = reply.status
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})

    async def _stream(
        self, send: Send, fd: int, start: int, stop: int, fill: Fill | None, *, end: bool = True
    ) -> None:
        """Send bytes [start, stop) of the file (stop -1: to the end of an unsized fill)."""
        if fill is None and self._zero_copy and stop - start > INLINE_READ:
            # A small body read on the loop leaves with its head in one write: cheaper than
            # writing the head, then a sendfile.
            await self._send_file(send, fd, start, stop, end=end)
            return
        loop = asyncio.get_running_loop()
        position = start
        sent = 0
        cache = self._cache
        size = CHUNK

        def read_small(small: bool) -> None:
            nonlocal size
            size = CHUNK if small else FAST_CHUNK

        pacer = ReadPacer(read_small, loop.time())
        try:
            while stop < 0 or position < stop:
                if fill is not None and fill.published and stop < 0:
                    stop = fill.written
                    continue
                # The object's last byte goes out only once it is verified and stored: a
                # client that trusts Content-Length never ends a clean body early. From a
                # slice fill, so does the last byte this answer takes from it (the wait is
                # one slice at most): no range ends cleanly on bytes a digest then refutes.
                held = -1
                if fill is not None and fill.length is not None:
                    held = fill.length
                    if fill.slice is not None and stop >= 0:
                        held = min(held, stop)
                if fill is not None and not fill.published and held >= 0 and position >= held - 1:
                    await fill.wait_finished()
                    if not fill.published:
                        self._abort(f"cache fill failed: {fill.failed}")
                if fill is not None and not fill.published:
                    await fill.wait_beyond(position)
                    if fill.written <= position:
                        if fill.published and stop < 0:
                            continue
                        self._abort(f"cache fill failed: {fill.failed}")
                    available = fill.written
                    if held >= 0 and not fill.published:
                        available = min(available, held - 1)
                else:
                    available = stop
                want = min(size, available - position)
                if stop >= 0:
                    want = min(want, stop - position)
                if want <= INLINE_READ:
                    chunk = os.pread(fd, want, position)
                else:
                    chunk = await loop.run_in_executor(None, os.pread, fd, want, position)
                if not chunk:
                    self._abort("cached file shorter than its meta")
                position += len(chunk)
                sent += len(chunk)
                if fill is None:
                    cache.stats.bytes_from_cache += len(chunk)
                pacer.sent(len(chunk), loop.time())
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                async with asyncio.timeout(self._send_timeout):
                    await send(WAIT_FOR_CLIENT)
        except TimeoutError:
            self._exchange.outcome = "client_abort"
            self._reset()
            raise TransferAborted("client stopped reading") from None
        finally:
            self._exchange.bytes_sent = sent
        if fill is not None and not fill.published:
            # The last bytes are out only once the object is verified and stored.
            await fill.wait_finished()
            if not fill.published:
                self._abort(f"cache fill failed: {fill.failed}")
        if end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_file(self, send: Send, fd: int, start: int, stop: int, *, end: bool) -> None:
        """Send bytes [start, stop) of a complete file with the server's zero-copy send."""
        loop = asyncio.get_running_loop()
        stats = self._cache.stats
        position = start
        size = CHUNK

        def read_small(small: bool) -> None:
            nonlocal size
            size = CHUNK if small else FAST_CHUNK

        pacer = ReadPacer(read_small, loop.time())
        message = {"type": ZERO_COPY_SEND, "file": fd, "offset": 0, "count": 0, "more_body": True}
        try:
            while position < stop:
                count = min(size, stop - position)
                message["offset"] = position
                message["count"] = count
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await send(message)
                except EOFError:
                    self._abort("cached file shorter than its meta")
                position += count
                stats.bytes_from_cache += count
                stats.bytes_zero_copy += count
                pacer.sent(count, loop.time())
        except TimeoutError:
            self._exchange.outcome = "client_abort"
            self._reset()
            raise TransferAborted("client stopped reading") from None
        finally:
            self._exchange.bytes_sent = position - start
        if end:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _abort(self, reason: str) -> NoReturn:
        self._exchange.outcome = "upstream_abort"
        logger.warning("aborting the client transfer: %s", reason)
        self._reset()
        raise TransferAborted(reason)

    def _reset(self) -> None:
        reset = self._scope_reset
        if reset is not None:
            reset()

    _scope_reset: Callable[[], None] | None = None
    _revalidated = False
    _stale_status: int | None = None
    _zero_copy = False

    async def _send_error(self, send: Send, status: int, text: str) -> None:
        body = f"{status} {text}\n".encode()
        self.status_code = status
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"text/plain; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _fresh(meta: Meta) -> bool:
    return freshness(httpx.Headers(meta.headers), _age(meta), meta.lifetime).fresh


def _age(meta: Meta) -> float:
    return meta.initial_age + max(0.0, time.time() - meta.stored_at)


def _ttl(meta: Meta) -> float:
    return meta.lifetime - _age(meta)
