"""The one upstream fetch of an object: written to its partial file at its offsets, waking every
attached reader at each advance, published (fsync, meta, rename) only when complete and
verified.

A fill belongs to the cache, not to a client: clients hold it (from when their response takes
it until that response ends) and attach while reading it. With no client it is background
work, bounded by the cache (`Cache` in cache.py): it runs on for `cache_fill_idle_timeout`
(a prefetch to completion) unless the cache stops it first (`stop`) to keep fills without
clients under their limit or to give a client's request its upstream connection. A stopped
fill publishes nothing, as after the idle timeout, and it can only be stopped before its body
is complete. A body the upstream cuts is resumed by `relay.http.continuation`'s rules (same
validator, same total); if it cannot be, the fill fails and every attached reader aborts its
transfer.

A chunked body that outgrows what may be stored is not stored: the fill offers its live
upstream response (`Rest`) to its readers and gives up owning it to the first that takes it
(`take_rest`); the others continue with Range + If-Range (`continue_at`). A rest nobody takes
is closed by the fill, once.

Whatever the upstream answers, that one request answers the clients holding the fill: an
answer the cache may not store (an error, a redirect, `no-store`...) goes through the partial
file like any other and is never published, so a single-use URL is fetched once and eight
clients waiting on a 503 cost the upstream one request. Not every answer may be shared: one
meant for one client (`private`, `Set-Cookie`) goes to the first client that takes it
(`claim`), the others are relayed each on their own; one the file cannot hold from its head
on (a Content-Length over the object limit or the budget) is kept open for the first GET that
takes it (`take_response`), to relay and close, the others relayed on their own; one that
varies on request headers the fill does not send as a client would (`Vary` beyond the key),
an index page relay cannot rewrite and a content-addressed object's refusal answer no client
(each is relayed). Readers read through `read_fd`, which stays open until the fill is over
and its last client gone, whatever becomes of the file's name. A purged fill (`purged`)
finishes serving its readers but publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from relay.cache.clock import Clock
from relay.cache.executor import DiskExecutor, Ordered
from relay.cache.index import Entry
from relay.cache.key import INDEX_MARK, VARIANT_MARK
from relay.cache.policy import (
    for_one_client,
    freshens,
    freshness_lifetime,
    initial_age,
    not_storable,
    updated_headers,
    vary_of,
)
from relay.cache.store import Meta, Store
from relay.config import Route
from relay.errors import TransferAborted, UpstreamError
from relay.http.continuation import STREAM_BACKOFF, Continuation, Next, Retries, content_length
from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.ranges import parse_content_range
from relay.http.resume import mark_continuation, resume_request_headers
from relay.http.validators import resume_validator
from relay.net.mirrors import pinned_sha256
from relay.net.presets import is_index_type, linked_sha256
from relay.net.redirects import REDIRECT_STATUSES, rewrite_location_headers
from relay.net.routing import RouteTable
from relay.net.upstream import Upstream
from relay.proxy.headers import BODYLESS_STATUSES, downstream_response_headers

if TYPE_CHECKING:
    from _hashlib import HASH

logger = logging.getLogger(__name__)

#: Response headers not kept with a stored object (recomputed for each answer).
_NOT_STORED = frozenset({b"content-length", b"age", b"content-range"})


VARY_LEARNED = "varies on Accept-Encoding"
#: Why an object over `cache_max_object_bytes` is not stored (whole or as slices).
TOO_LARGE = "too large"
#: Why an answer is not stored, when it can answer none of the fill's clients either: relay
#: refuses it (an index page it cannot rewrite, a Content-Range on a 200).
_ANSWERS_NONE = frozenset({"encoded index page", "partial index page", "content-range on a 200"})
#: Why an answer is not stored, when the partial file cannot hold it either.
_TOO_BIG = frozenset({TOO_LARGE, "no room"})


class FillAbandoned(Exception):
    pass


class Rest:
    """The rest of a body from the upstream: its response and the iterator of its raw bytes
    (a response's bytes are iterated once: whoever continues takes both). `aclose` releases
    both."""

    __slots__ = ("chunks", "response")

    def __init__(self, response: httpx.Response, chunks: AsyncIterator[bytes] | None = None):
        self.response = response
        self.chunks = chunks if chunks is not None else response.aiter_raw()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self.response.aclose()


class _Overflow(Exception):
    """An unsized body outgrew what may be stored: `rest` carries what follows."""

    def __init__(self, rest: Rest) -> None:
        super().__init__("too large to store")
        self.rest = rest


def stored_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in downstream_response_headers(raw, 200)
        if name not in _NOT_STORED
    ]


def _answer_headers(response: httpx.Response, routes: RouteTable) -> list[tuple[str, str]]:
    """The headers of an answer that is not stored, as its clients get them: a 200's as if
    stored; another status's as relayed (its Content-Range kept, a redirect's Location mapped
    onto relay's routes), Content-Length and Age left to each answer."""
    status = response.status_code
    if status == 200:
        return stored_headers(response.headers.raw)
    raw = downstream_response_headers(response.headers.raw, status)
    if status in REDIRECT_STATUSES:
        raw = rewrite_location_headers(raw, response.request.url, routes)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name not in (b"content-length", b"age")
    ]


def _without_keyed_vary(headers: httpx.Headers) -> httpx.Headers:
    """An index page's headers with the Vary names its key covers (Accept, Accept-Encoding)
    removed, for the storage rules."""
    names = [
        item.strip()
        for value in headers.get_list("vary")
        for item in value.split(",")
        if item.strip() and item.strip().lower() not in ("accept", "accept-encoding")
    ]
    out = httpx.Headers([(n, v) for n, v in headers.multi_items() if n.lower() != "vary"])
    if names:
        out["vary"] = ", ".join(names)
    return out


def _without_content_range(headers: httpx.Headers) -> httpx.Headers:
    """A 206's headers as the 200 of the whole object would carry them (for the storage
    rules)."""
    return httpx.Headers([(n, v) for n, v in headers.multi_items() if n.lower() != "content-range"])


def _unrewritable(route: Route, status: int, headers: httpx.Headers) -> str | None:
    """Why an index page can be neither stored for serve-time rewriting nor answered (the
    relayed path refuses it with a 502): an encoded index, a partial one."""
    if not is_index_type(route, headers.get("content-type", "")):
        return None
    if status == 206:
        return "partial index page"
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if status == 200 and encoding not in ("", "identity"):
        return "encoded index page"
    return None


class Fill:
    def __init__(
        self,
        *,
        key: str,
        variant: str,
        store: Store,
        request: httpx.Request,
        route: Route,
        upstream: Upstream,
        revalidating: Meta | None,
        resume_attempts: int,
        max_object_bytes: int,
        idle_timeout: float,
        reserve: Callable[[Fill, int], bool],
        on_stored: Callable[[Fill, Meta], None],
        on_refreshed: Callable[[Fill, Meta], None],
        on_replaced: Callable[[Fill], None],
        count_upstream_bytes: Callable[[int], None],
        clock: Clock,
        executor: DiskExecutor,
        disk: Ordered,
        on_clientless: Callable[[Fill], None],
        routes: RouteTable,
    ) -> None:
        self.key = key
        self.variant = variant
        self._store = store
        self.partial = store.partial_path(key)
        """This fill's own partial file (a new version's name): no other fill touches it."""
        self._request = request
        self._route = route
        self._upstream = upstream
        self.revalidating = revalidating
        self._resume_attempts = resume_attempts
        self._max_object_bytes = max_object_bytes
        self._idle_timeout = idle_timeout
        self._reserve = reserve
        self._on_stored = on_stored
        self._on_refreshed = on_refreshed
        self._on_replaced = on_replaced
        self._count = count_upstream_bytes
        self._clock = clock
        self._executor = executor
        self._disk = disk
        self._on_clientless = on_clientless
        self._routes = routes
        self.headers_ready = asyncio.Event()
        self._advance = asyncio.Event()
        self.written = 0
        self.length: int | None = None
        self.meta: Meta | None = None
        self.error: UpstreamError | None = None
        """The upstream could not be reached: answered as a relayed request would be."""
        self.upstream_status: int | None = None
        self._ttfb: float | None = None
        """Seconds from sending the upstream request to its response headers, until a
        request answered from this fill reports it (`claim_ttfb`)."""
        self.passthrough: str | None = None
        """Why the response is not stored: its clients are relayed instead."""
        self.passes_object = False
        """A slice fill: the passthrough reason is the object's own (not storable, too
        large), not this slice's: the whole object is passed, its ranges included."""
        self.overflowed = False
        """An unsized body outgrew what may be stored: nothing is published, and its readers
        get the rest from the upstream (`take_rest`, else `continue_at`) after what the
        partial file holds."""
        self._offered: Rest | None = None
        """The rest of an overflowed body while offered: its response is still the fill's own
        (`_response`) until a reader takes it."""
        self._continuation: Continuation | None = None
        self._pinned: str | None = None
        """The digest that lets a cut body continue from another mirror (`pinned_sha256`)."""
        self.refreshed: Meta | None = None
        self.superseded = False
        """The revalidation's 304 named another version: the stored response was dropped and
        this fill fetched the object again, unconditionally."""
        self.withdrawn = False
        """The revalidation's 304 made the stored response unfit for a shared cache
        (`private`, `no-store`...): it was dropped, and its waiting clients are relayed."""
        self.failed: str | None = None
        self.published = False
        self.complete = False
        """The whole body is in the file and checked (published, or an answer not stored):
        readers may send its last byte."""
        self.shared = False
        """An answer not stored that every client waiting on the fill shares; later requests
        for the key are filled again (not passed)."""
        self.for_one = False
        """An answer meant for one client (`private`, `Set-Cookie`): see `claim`."""
        self._claimed = False
        self.purged = False
        """A purge covered the key while it was being filled: nothing is published."""
        self.read_fd: int | None = None
        """The descriptor readers of the body read from (with pread)."""
        self.open_answer: httpx.Response | None = None
        """An answer not stored that the file cannot hold from its head on: the open upstream
        response, until a client takes it (`take_response`)."""
        self._varies_on_encoding = False
        self.finished = False
        self.reserved = 0
        self.readers = 0
        self.coalesced = 0
        self.digest_mismatch = False
        self.prefetch = False
        """Started without a client: runs to completion, whatever the idle timeout."""
        self.sha256: str | None = None
        """The digest the whole body must have (a content-addressed object), checked before
        anything the upstream's own headers announce."""
        self.immutable = False
        """The operator declared this file immutable (`is_immutable`): it stays fresh for at
        least a year unless the upstream says `no-cache`; an index page never is."""
        self.revalidate = False
        """A preset's metadata revalidated by every request (`revalidated`)."""
        self.slice: tuple[int, int, str | None] | None = None
        """A slice fill: (first byte, last byte, the validator it must carry or None)."""
        self.total: int | None = None
        """A slice fill: the whole object's length, from Content-Range."""
        self.object_key = ""
        """A slice fill: the storage key of the object it is a slice of."""
        self._content_sha256: str | None = None
        """A slice fill: the SHA-256 the 206's Content-Digest announces for its bytes."""
        self.task: asyncio.Task[None] | None = None
        """The task running `run` (set by the cache when it starts it)."""
        self.stopping: str | None = None
        """Why the cache stopped the fill (`stop`), once it did."""
        self._holds = 0
        self._started = False
        self._opening = False
        self._body_done = False
        self._idle_since: float | None = clock.monotonic()
        self._response: httpx.Response | None = None
        """The one upstream response the fill holds (the first, then each resumed one), closed
        by `_close_response` before another is opened and in `run`'s `finally`."""

    @property
    def upstream_failure(self) -> int | None:
        """The status telling that the upstream failed (unreachable: the error's; a 5xx), or
        None: what decides a stale-if-error answer."""
        if self.error is not None:
            return self.error.status_code
        status = self.upstream_status
        return status if status is not None and status >= 500 else None

    def claim_ttfb(self) -> float | None:
        """The upstream's time to first byte, handed to one request only: each upstream
        request is observed once, however many clients its response answers."""
        ttfb, self._ttfb = self._ttfb, None
        return ttfb

    # ---- clients ------------------------------------------------------------------------

    def hold(self) -> None:
        """A client's response uses this fill (waits on it or reads it) until `release`."""
        self._holds += 1
        self._idle_since = None

    def release(self) -> None:
        self._holds -= 1
        self._left()

    def attach(self) -> None:
        """A client reads the body as it is written (counted for coalescing)."""
        if self.readers:
            self.coalesced += 1
        self.readers += 1
        self._idle_since = None

    def detach(self) -> None:
        self.readers -= 1
        self._left()

    def _left(self) -> None:
        if self._holds == 0 and self.readers == 0:
            self._idle_since = self._clock.monotonic()
            if self.finished:
                self._close_reader()
            if self.open_answer is not None:
                self._notify()  # nobody left to take it: the fill closes it
            self._on_clientless(self)
        if self.readers == 0 and self._offered is not None:
            self._notify()  # no reader left to take the rest of an overflowed body

    @property
    def holders(self) -> int:
        """How many clients' responses hold the fill (waiting on it or reading it)."""
        return self._holds

    @property
    def _has_clients(self) -> bool:
        return self._holds > 0 or self.readers > 0

    def claim(self, variant: str) -> bool:
        """Whether this fill's answer is also the answer of a client of encoding `variant`:
        it has one and has not failed; one varying on Accept-Encoding only for its own
        variant; one meant for one client only for the first that claims it."""
        meta = self.meta
        if meta is None or self.failed is not None:
            return False
        if meta.vary and meta.extra.get("variant") != variant:
            return False
        if self.for_one:
            if self._claimed:
                return False
            self._claimed = True
        return True

    def take_response(self, variant: str) -> httpx.Response | None:
        """The open upstream response of an answer the file cannot hold, for the first GET
        (of a variant it answers) that takes it: then that client's, to relay and to close."""
        response = self.open_answer
        if response is None or (self._varies_on_encoding and variant != self.variant):
            return None
        self.open_answer = None
        self._notify()
        return response

    def _close_reader(self) -> None:
        fd, self.read_fd = self.read_fd, None
        if fd is not None:
            os.close(fd)

    @property
    def stoppable(self) -> bool:
        """Not over, and its body not yet complete: stopping it now publishes nothing.

        An overflowed fill offering its rest stays stoppable: the cache stops only fills with
        no client (`background`), and one with no reader left closes its rest anyway, so
        stopping it cuts nobody and frees its connection at once. Were one stopped with
        readers, none would end cleanly: the rest not taken is closed, and each reader goes
        on with `continue_at` (a judged continuation) or aborts."""
        return not self.finished and not self._body_done and self.stopping is None

    @property
    def going(self) -> bool:
        """Running, and not being stopped: a client may join it."""
        return not self.finished and self.stopping is None

    @property
    def background(self) -> bool:
        """No client waits for this fill, and the cache may still stop it."""
        return self._holds == 0 and self.readers == 0 and self.stoppable

    @property
    def using_upstream(self) -> bool:
        """Holding (or opening) an upstream response: stopping it frees a connection."""
        return self._opening or self._response is not None or self.open_answer is not None

    @property
    def idle_since(self) -> float:
        """When its last client left (or it started without one); +inf while it has one."""
        since = self._idle_since
        return since if since is not None else float("inf")

    def stop(self, reason: str) -> None:
        """Stop a fill no client waits for: its upstream response is closed and nothing is
        published, as after the idle timeout. The cache calls this only while `stoppable`."""
        self.stopping = reason
        if self._started and self.task is not None:
            self.task.cancel()  # a fill not started yet stops as it starts

    async def wait_beyond(self, position: int) -> None:
        """Return once more than `position` bytes are written, or the fill is over (or
        overflowed: the rest is the upstream's)."""
        while self.written <= position and not self.finished and not self.overflowed:
            await self._advance.wait()

    # ---- the rest of a body too large to store ------------------------------------------

    def take_rest(self) -> Rest | None:
        """The live upstream response of an overflowed fill, continuing right after the
        `written` bytes, to the first reader that asks (it then owns and closes it); None
        once taken or closed."""
        rest, self._offered = self._offered, None
        if rest is not None:
            # No longer the fill's: `_close_response` (in `run`'s finally) must not close it.
            assert rest.response is self._response
            self._response = None
            self._notify()
        return rest

    async def continue_at(self, position: int) -> Rest | None:
        """An upstream response continuing an overflowed body at `position` (Range +
        If-Range on its strong validator, judged by `relay.http.continuation`), owned by the
        caller; None when the body cannot be continued."""
        plan = self._continuation
        if plan is None:
            return None
        request = self._upstream.build_request(
            "GET",
            self._request.url,
            resume_request_headers(plan, self._request, position),
            self._route,
        )
        mark_continuation(request, None)
        try:
            response = await self._upstream.open(request, self._route)
        except UpstreamError:
            return None
        if plan.judge(response.status_code, response.headers, position).continues:
            return Rest(response)
        await response.aclose()
        return None

    async def _hand_over(self, rest: Rest, first: httpx.Response) -> None:
        """Offer the live response (the one the fill holds) to the readers (the first to reach
        `written` takes it); return once it is taken or no reader is left. One not taken is
        closed here, with its byte iterator, and is then no longer the fill's to close."""
        self._continuation = Continuation.for_response(first)
        self._offered = rest
        self.overflowed = True
        self._notify()
        try:
            while self._offered is not None and self.readers:
                await self._advance.wait()
        finally:
            if self._offered is not None:
                self._offered = None
                self._response = None
                await asyncio.shield(rest.aclose())

    async def wait_finished(self) -> None:
        while not self.finished:
            await self._advance.wait()

    def _notify(self) -> None:
        event, self._advance = self._advance, asyncio.Event()
        event.set()

    # ---- the fetch ----------------------------------------------------------------------

    def _immutable(self, headers: httpx.Headers) -> bool:
        return self.immutable and not is_index_type(self._route, headers.get("content-type", ""))

    async def run(self) -> None:
        fd: int | None = None
        self._started = True
        try:
            if self.stopping is not None:
                raise FillAbandoned(self.stopping)
            try:
                response = self._response = await self._open(self._request)
            except UpstreamError as exc:
                self.error = exc
                return
            if not await self._take(response):
                if self.open_answer is not None:
                    self.headers_ready.set()
                    while self.open_answer is not None and self._has_clients:
                        await self._advance.wait()  # until a client takes it, or none is left
                return
            # The response whose body is stored (a 304 naming another version was followed
            # by the object's unconditional fetch: `_not_modified`).
            response = self._response
            assert response is not None
            fd = self._store.open_partial(self.partial)
            self.read_fd = os.open(self.partial, os.O_RDONLY)
            self.headers_ready.set()
            try:
                await self._write_body(response, fd)
            except _Overflow as over:
                # Not stored: the live response goes to a reader (then it is no longer the
                # fill's `_response`) or is closed by `_hand_over`.
                await self._hand_over(over.rest, response)
                return
            # The whole body is in: its connection goes back before the fsync and publish.
            self._body_done = True
            await self._close_response()
            await self._publish(fd, response.headers)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self.stopping is None or (task is not None and task.uncancel() > 0):
                self.failed = "cancelled"
                raise
            self.failed = self.stopping
            logger.info("cache fill stopped: %s (%s)", self.stopping, self._request.url.path)
        except FillAbandoned as exc:
            self.failed = str(exc)
            logger.info("cache fill stopped: %s (%s)", exc, self._request.url.path)
        except (TransferAborted, httpx.HTTPError, OSError, DigestConflict) as exc:
            self.failed = str(exc) or type(exc).__name__
            logger.warning(
                "cache fill failed after %d bytes: %s (%s)",
                self.written,
                self.failed,
                self._request.url.path,
            )
        except Exception as exc:  # never leave readers waiting on an unforeseen failure
            self.failed = type(exc).__name__
            logger.exception("cache fill failed (%s)", self._request.url.path)
        finally:
            # Finished only once its response, descriptor and partial file are released: a
            # fill of the same key starts only then (Cache.fill).
            try:
                await self._close_response()
                unclaimed, self.open_answer = self.open_answer, None
                if unclaimed is not None:
                    await asyncio.shield(unclaimed.aclose())
            finally:
                if fd is not None:
                    os.close(fd)
                if not self._has_clients:
                    self._close_reader()  # else the last client's release closes it
                if not self.published:
                    self._store.remove_partial(self.partial)
                self.finished = True
                self.headers_ready.set()
                self._notify()

    async def _open(self, request: httpx.Request) -> httpx.Response:
        """Open an upstream response (as background work when no client waits); its time
        to first byte is kept for the request that reports it (`claim_ttfb`)."""
        self._opening = True
        sent_at = self._clock.monotonic()
        try:
            response = await self._upstream.open(request, self._route, background=self.background)
        finally:
            self._opening = False
        self._ttfb = self._clock.monotonic() - sent_at
        return response

    async def _close_response(self) -> None:
        """Close the upstream response the fill holds, if any (shielded: a close must finish
        even while the fill is being cancelled)."""
        response, self._response = self._response, None
        if response is not None and not response.is_closed:
            await asyncio.shield(response.aclose())

    async def _take(self, response: httpx.Response) -> bool:
        """Whether the response's body is to be written (stored, or to answer the fill's
        clients); if not, records why and closes it, or keeps it for `take_response`."""
        status = self.upstream_status = response.status_code
        headers = response.headers
        received = self._clock.now()
        if status == 304 and self.revalidating is not None and not self.superseded:
            return await self._not_modified(response, received)
        if self.slice is not None:
            if self.revalidating is not None and not self.superseded and status in (200, 206):
                # A body, not a 304: the stale slices are another version (or no longer
                # trusted). An error says nothing of the object: they are kept, still stale.
                self._on_replaced(self)
            return await self._take_slice(response)
        index_page = INDEX_MARK in self.key
        policy = self._policy(headers)
        reason = not_storable(status, policy)
        if reason is None and vary_of(policy) and VARIANT_MARK not in self.key:
            reason = VARY_LEARNED  # stored per encoding from the next request on
        if index_page:
            reason = _unrewritable(self._route, status, headers) or reason
        length = content_length(headers)
        if reason is None and length is not None and length > self._max_object_bytes:
            reason = TOO_LARGE
        if (
            reason is None
            and "content-length" not in headers
            and "transfer-encoding" not in headers
            and _announced_sha256(headers) is None
        ):
            # A close-delimited body cut short looks complete: stored only when an announced
            # digest will tell (checked before it is published).
            reason = "body delimited by close"
        if reason is None and not self._reserve(self, length or 0):
            reason = "no room"
        if reason is not None:
            self.passthrough = reason
            answers = self._answers_unstored(reason, status, policy)
            self.shared = answers == "all"
            self.for_one = answers == "one"
            if answers == "none" or not self._has_clients:
                # Nobody to answer (a prefetch, clients gone): nothing to write.
                await self._close_response()
                return False
            if status in BODYLESS_STATUSES:
                length = 0
            if reason in _TOO_BIG or (length is not None and not self._reserve(self, length)):
                await self._keep_open(reason, length, policy)
                return False
        self.length = length
        self.meta = Meta(
            key=self.key,
            url=str(self._request.url.copy_with(query=None)),
            headers=stored_headers(headers.raw)
            if reason is None
            else _answer_headers(response, self._routes),
            length=length or 0,
            stored_at=received,
            initial_age=initial_age(headers, received, received),
            lifetime=freshness_lifetime(
                headers, immutable=self._immutable(headers), revalidate=self.revalidate
            ),
            validator=resume_validator(headers) if status == 200 else None,
            vary=vary_of(policy) or "",
            status=status,
            extra={"variant": self.variant},
        )
        return True

    def _policy(self, headers: httpx.Headers) -> httpx.Headers:
        """The headers the storage rules read: an index page's Vary names its key covers
        (Accept, Accept-Encoding) removed."""
        return _without_keyed_vary(headers) if INDEX_MARK in self.key else headers

    async def _not_modified(self, response: httpx.Response, received: float) -> bool:
        """A 304 for the stored response this fill revalidates (RFC 9111 4.3.4). It
        refreshes that response only if its validator is the stored one's and the updated
        response may still be stored by a shared cache. If it names another version, the
        stored bytes are not that version: the stored response is dropped, and the object
        fetched once unconditionally by this fill (its waiting clients get the new version).
        If the update forbids storing it (`private`, `no-store`, `Set-Cookie`, a Vary relay
        does not key): dropped, and its waiting clients relayed (`withdrawn`)."""
        await self._close_response()
        old = self.revalidating
        assert old is not None
        headers = response.headers
        if not freshens(httpx.Headers(old.headers), headers):
            self.superseded = True
            self._on_replaced(self)
            logger.info(
                "cache: a 304 named %s, not the stored %s: fetched again (%s)",
                headers.get("etag") or headers.get("last-modified"),
                old.validator,
                self._request.url.path,
            )
            try:
                fetched = self._response = await self._open(self._unconditional())
            except UpstreamError as exc:
                self.error = exc
                return False
            return await self._take(fetched)
        updated = updated_headers(old.headers, stored_headers(headers.raw))
        refreshed_headers = httpx.Headers(updated)
        reason = not_storable(200, self._policy(refreshed_headers))
        if reason is not None:
            self.passthrough = reason
            self.withdrawn = True
            self._on_replaced(self)
            return False
        lifetime_headers = httpx.Headers([*refreshed_headers.multi_items()])
        if "date" in headers:
            lifetime_headers["date"] = headers["date"]
        old_lm = old.extra.get("last-modified-for-heuristic")
        if old_lm and "last-modified" not in lifetime_headers:
            lifetime_headers["last-modified"] = old_lm
        meta = Meta(
            key=old.key,
            url=old.url,
            headers=updated,
            length=old.length,
            stored_at=received,
            initial_age=initial_age(headers, received, received),
            lifetime=freshness_lifetime(
                lifetime_headers,
                immutable=self._immutable(refreshed_headers),
                revalidate=self.revalidate,
            ),
            validator=old.validator,
            sha256=old.sha256,
            vary=old.vary,
            complete=True,
            extra=old.extra,
        )
        self._on_refreshed(self, meta)
        self.refreshed = meta
        return False

    def _unconditional(self) -> httpx.Request:
        """This fill's request without its conditions (a slice's Range stays)."""
        headers = [
            (name, value)
            for name, value in self._request.headers.multi_items()
            if name.lower() not in ("if-none-match", "if-modified-since", "if-range")
        ]
        return self._upstream.build_request("GET", self._request.url, headers, self._route)

    async def _keep_open(self, reason: str, length: int | None, headers: httpx.Headers) -> None:
        """An answer not stored that the file cannot hold from its head on: the open response
        the fill holds is kept for the first client that takes it (a content-addressed
        object's is closed: each client asks the Hub again)."""
        if reason not in _TOO_BIG and length is not None:
            self.passthrough = TOO_LARGE if length > self._max_object_bytes else "no room"
        self.shared = self.for_one = False  # later requests are relayed (pass)
        if self.sha256 is not None:
            await self._close_response()
            return
        self._varies_on_encoding = vary_of(headers) == "accept-encoding"
        self.open_answer, self._response = self._response, None

    def _answers_unstored(self, reason: str, status: int, headers: httpx.Headers) -> str:
        """Which of the fill's clients an answer that is not stored answers (`headers`: its
        headers as the storage rules read them): "all", "one" (meant for one client), or
        "none" (each is relayed)."""
        if reason in _ANSWERS_NONE or vary_of(headers) is None:
            return "none"
        if self.sha256 is not None and status != 200:
            # The Hub named this object to each client on its own request (its credentials
            # included): a refusal of the fill is not every client's answer.
            return "none"
        return "one" if for_one_client(headers) else "all"

    async def _take_slice(self, response: httpx.Response) -> bool:
        """A slice is stored only from a 206 of exactly the bytes asked for, with a strong
        validator (the one asked for in If-Range, once one is known) and the total length."""
        assert self.slice is not None
        first, last, validator = self.slice
        headers = response.headers
        received = self._clock.now()
        reason: str | None = None
        parsed = parse_content_range(headers.get("content-range"))
        strong = resume_validator(headers)
        if response.status_code == 200:
            reason = "changed" if validator is not None else "no byte ranges"
        elif response.status_code != 206 or parsed is None or parsed.total is None:
            reason = f"status {response.status_code}"
        elif parsed.start != first or parsed.end != min(last, parsed.total - 1):
            reason = "unexpected Content-Range"
        elif parsed.total > self._max_object_bytes or (
            reason := not_storable(200, _without_content_range(headers))
        ):
            # The object itself may not be stored (too large, private, Set-Cookie, Vary: *):
            # its other ranges are relayed as the client asked (the key is passed).
            reason = reason or TOO_LARGE
            self.passes_object = True
        elif vary_of(headers) != "":
            reason = "vary"
        elif strong is None or (validator is not None and strong != validator):
            reason = "changed" if strong is not None else "no strong validator"
        try:
            self._content_sha256 = upstream_sha256(
                httpx.Headers([("repr-digest", v) for v in headers.get_list("content-digest")])
            )
            whole_sha256 = self.sha256 or upstream_sha256(headers) or linked_sha256(headers)
        except DigestConflict:
            reason = reason or "conflicting digests"
            whole_sha256 = None
        length = parsed.end - parsed.start + 1 if parsed is not None else 0
        if reason is None and not self._reserve(self, length):
            reason = "no room"
        if reason is not None:
            self.passthrough = reason
            await self._close_response()
            return False
        assert parsed is not None
        assert parsed.total is not None
        self.length = length
        self.total = parsed.total
        self.meta = Meta(
            key=self.key,
            url=str(self._request.url.copy_with(query=None)),
            headers=stored_headers(headers.raw),
            length=length,
            stored_at=received,
            initial_age=initial_age(headers, received, received),
            lifetime=freshness_lifetime(
                headers, immutable=self._immutable(headers), revalidate=self.revalidate
            ),
            validator=strong,
            vary=vary_of(headers) or "",
            extra={"total": str(parsed.total), "first": str(first)},
        )
        if whole_sha256 is not None:
            # The whole object's digest: checked once every slice is stored (Cache).
            self.meta.extra["repr-sha256"] = whole_sha256
        return True

    async def _write_body(self, first: httpx.Response, fd: int) -> None:
        """Write the body of `first`, resuming it (each resumed response replacing the one the
        fill holds) when the upstream cuts it."""
        response = first
        plan: Continuation | None = None
        retries = Retries(self._resume_attempts, STREAM_BACKOFF)
        self._hash = hashlib.sha256()
        while True:
            try:
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    size = len(chunk)
                    over = self.length is None and not self._reserve(self, size)
                    if over:
                        # Never stored; this chunk is kept (one past the reservation) and
                        # the rest goes to the readers from the upstream: never a cut body.
                        too_large = self.written + size > self._max_object_bytes
                        self.passthrough = TOO_LARGE if too_large else "no room"
                        self.shared = False  # later requests are relayed (pass)
                    if self.length is not None and self.written + size > self.length:
                        raise TransferAborted("upstream sent more than its Content-Length")
                    # One hop per chunk: written and hashed on the cache's thread.
                    await _write_at(self._executor, fd, chunk, self.written, self._hash)
                    self.written += size
                    self._count(size)
                    self._notify()
                    if over:
                        assert response is self._response  # the one the fill holds
                        raise _Overflow(Rest(response, chunks))
                    self._check_idle()
                break
            except httpx.HTTPError as exc:
                if plan is None and self._resume_attempts:
                    plan = Continuation.for_response(first)
                    if self.slice is None and first.status_code == 200:
                        url, headers = first.request.url, first.headers
                        self._pinned = pinned_sha256(self._route, url.path, headers, self.sha256)
                if plan is None or not retries.fail():
                    raise TransferAborted(f"upstream body failed: {exc}") from exc
                response = await self._resume(plan, response.request, retries)
        if self.length is not None and self.written != self.length:
            raise TransferAborted(f"short body: {self.written} of {self.length} bytes")

    def _check_idle(self) -> None:
        if not self._has_clients and (self.passthrough is not None or self.purged):
            raise FillAbandoned("no client left for an answer that is not stored")
        since = self._idle_since
        if (
            since is not None
            and not self.prefetch
            and self._clock.monotonic() - since > self._idle_timeout
        ):
            raise FillAbandoned("no client for cache_fill_idle_timeout")

    async def _resume(
        self, plan: Continuation, failed: httpx.Request, retries: Retries
    ) -> httpx.Response:
        """The response continuing the body from `self.written` (now the one the fill holds);
        the failed one is closed first."""
        await self._close_response()
        while True:
            await asyncio.sleep(retries.delay())
            request = self._upstream.build_request(
                "GET",
                failed.url,
                resume_request_headers(plan, failed, self.written),
                self._route,
            )
            mark_continuation(request, self._pinned)
            try:
                response = self._response = await self._open(request)
            except UpstreamError as exc:
                cause = f"resume failed: {exc.reason}"
            else:
                verdict = plan.judge_answer(response, self.written)
                if verdict.continues:
                    logger.info("cache fill resumed at %d bytes", self.written)
                    return response
                await self._close_response()
                cause = verdict.reason
                if verdict.next is not Next.RETRY:
                    raise TransferAborted(f"cannot resume: {cause}")
            if not retries.fail():
                raise TransferAborted(f"cannot resume: {cause}")

    async def _publish(self, fd: int, headers: httpx.Headers) -> None:
        assert self.meta is not None
        whole = self.slice is None
        expected = (
            (self.sha256 or upstream_sha256(headers) or linked_sha256(headers) or self._pinned)
            if whole
            else None
        )
        if not whole:
            expected = self._content_sha256  # a slice's own bytes, when announced
        actual = self._hash.hexdigest()
        if expected is not None and expected != actual:
            self.digest_mismatch = True
            raise DigestMismatch(f"sha256 {actual} does not match the announced {expected}")
        if self.passthrough is not None or self.purged:
            self.complete = True  # its readers end it; it is not stored
            return
        meta = self.meta
        meta.length = self.written
        meta.sha256 = actual if expected is not None else None
        # After any job asked for on this object's files (a removal, a rewrite): in order.
        # Shielded: cancelled here, the job still runs its course (a thread cannot be
        # stopped), and the jobs after it on this object must wait for that.
        await asyncio.shield(
            self._disk.submit([self.key], _publish, fd, self._store, self.partial, meta)
        )
        self.complete = True
        if self.purged:
            # Purged while it was being published: what was just written goes too.
            data = self._store.published_path(self.partial)
            entry = Entry(self.key, data, meta)
            await asyncio.shield(self._disk.submit([self.key], self._store.remove, entry))
            return
        self.published = True
        self._on_stored(self, meta)


def _write_hashed(fd: int, chunk: bytes, offset: int, digest: HASH) -> None:
    """Write `chunk` at `offset` (all of it) and add it to the running digest (blocking)."""
    view = memoryview(chunk)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    digest.update(chunk)


def _publish(fd: int, store: Store, partial: Path, meta: Meta) -> None:
    os.fsync(fd)
    store.publish(partial, meta)


async def _write_at(
    executor: DiskExecutor, fd: int, data: bytes, offset: int, digest: HASH
) -> None:
    """`_write_hashed` on the cache's threads. Cancelled meanwhile (a fill being stopped), it
    returns only once the write is over: the caller closes `fd` next, and a descriptor closed
    under a write in flight could be reused by another file by the time the write runs."""
    write = executor.submit(_write_hashed, fd, data, offset, digest)
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        while not write.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({write})
        if not write.cancelled():
            write.exception()  # retrieved: the cancellation is what the caller sees
        raise


class Holds:
    """The fills one client's response uses (waits on or reads), each held from when the
    response takes it until `release` in the response's own `finally`: a fill a client waits
    for is not background work (the cache neither stops it nor counts it as such)."""

    __slots__ = ("_fills",)

    def __init__(self) -> None:
        self._fills: list[Fill] = []

    async def take(self, get: Callable[[], Fill]) -> Fill:
        """The fill `get` gives (in flight, or a new one), held. One the cache stopped just as
        this client came (nothing of it will be published) is waited out, and the one that
        follows it taken instead."""
        fill = get()
        while fill.stopping is not None and fill.task is not None and not fill.task.done():
            await asyncio.wait({fill.task})
            fill = get()
        fill.hold()
        self._fills.append(fill)
        return fill

    def release(self) -> None:
        fills, self._fills = self._fills, []
        for fill in fills:
            fill.release()


def _announced_sha256(headers: httpx.Headers) -> str | None:
    try:
        return upstream_sha256(headers) or linked_sha256(headers)
    except DigestConflict:
        return None


class DigestMismatch(OSError):
    """The completed body does not match the digest the upstream announced."""


__all__ = [
    "TOO_LARGE",
    "DigestMismatch",
    "Fill",
    "FillAbandoned",
    "Holds",
    "Rest",
    "stored_headers",
]
