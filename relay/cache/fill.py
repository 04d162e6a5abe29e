"""The one upstream fetch of an object: written to its partial file at its offsets, waking every
attached reader at each advance, published (fsync, meta, rename) only when complete and
verified.

A fill belongs to the cache, not to a client: clients hold it (`relay.cache.holds`). With no
client it is background work, bounded by the cache (`Cache` in cache.py): it runs on for
`cache_fill_idle_timeout` (a prefetch to completion) unless the cache stops it first (`stop`)
to keep fills without clients under their limit or to give a client's request its upstream
connection. A stopped fill publishes nothing, as after the idle timeout, and it can only be
stopped before its body is complete. A body the upstream cuts is resumed by
`relay.http.continuation`'s rules (same validator, same total); if it cannot be, the fill fails
and every attached reader aborts its transfer. A chunked body that outgrows what may be stored
is handed over to a reader (`relay.cache.overflow`).

Whatever the upstream answers, that one request answers the clients holding the fill, as
`relay.cache.storable` decides: an answer the cache may not store goes through the partial
file like any other and is never published, so a single-use URL is fetched once and eight
clients waiting on a 503 cost the upstream one request; one meant for one client goes to the
first client that takes it (`claim`); one the file cannot hold is kept open for the first GET
that takes it (`take_response`). Readers read through `read_fd`, which stays open until the
fill is over and its last client gone, whatever becomes of the file's name. A purged fill
(`purged`) finishes serving its readers but publishes nothing. A request whose credential
expires while the fill runs (a registry's token) is authorized again, once per request, after a
401 (`relay.http.authorize`, done by `Upstream.open`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from typing import TYPE_CHECKING, Protocol

import httpx

from relay.cache import storable
from relay.cache.clock import Clock
from relay.cache.executor import DiskExecutor, Ordered
from relay.cache.holds import SharedFill
from relay.cache.index import Entry
from relay.cache.overflow import HandOver, Overflow, Rest
from relay.cache.partial import open_partial, publish, write_at
from relay.cache.policy import freshens, vary_of
from relay.cache.store import Meta, Store
from relay.config import Config, Route
from relay.errors import TransferAborted, UpstreamError
from relay.http.authorize import authorized_as
from relay.http.continuation import STREAM_BACKOFF, Continuation, Next, Retries
from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.resume import mark_continuation, resume_request_headers
from relay.net.mirrors import named_sha256, pinned_sha256
from relay.net.presets import linked_sha256
from relay.net.routing import RouteTable
from relay.net.upstream import Upstream, mirror_place

if TYPE_CHECKING:
    pass

logger = logging.getLogger(__name__)


class FillAbandoned(Exception):
    pass


class Owner(Protocol):
    """What a fill needs of the cache that runs it (`relay.cache.cache.Cache`)."""

    config: Config
    store: Store
    upstream: Upstream
    clock: Clock
    executor: DiskExecutor
    disk: Ordered
    routes: RouteTable
    max_object_bytes: int

    def reserve(self, fill: Fill, size: int) -> bool:
        """Room for `size` more bytes of the fill (beyond what it wrote), evicting if need be."""

    def count_upstream(self, size: int) -> None:
        """Body bytes the fill fetched."""

    def fill_stored(self, fill: Fill, meta: Meta) -> None:
        """The fill published a new version."""

    def fill_refreshed(self, fill: Fill, meta: Meta) -> None:
        """A 304 refreshed the stored response the fill revalidates."""

    def fill_replaced(self, fill: Fill) -> None:
        """The stored response the fill revalidates is dropped (another version, unfit)."""

    def fill_lost_clients(self, fill: Fill) -> None:
        """The last client of the fill left."""


class Fill(SharedFill):
    def __init__(
        self,
        owner: Owner,
        *,
        key: str,
        variant: str,
        request: httpx.Request,
        route: Route,
        revalidating: Meta | None,
    ) -> None:
        super().__init__(key=key, variant=variant, clock=owner.clock)
        self._owner = owner
        self._store = owner.store
        self._upstream = owner.upstream
        self._clock = owner.clock
        self.partial = owner.store.partial_path(key)
        """This fill's own partial file (a new version's name): no other fill touches it."""
        self._request = request
        self._route = route
        self.revalidating = revalidating
        self._max_object_bytes = owner.max_object_bytes
        self.error: UpstreamError | None = None
        """The upstream could not be reached: answered as a relayed request would be."""
        self.upstream_status: int | None = None
        self.upstream_mirror: int | None = None  # the answering mirror's place (from 1)
        self._ttfb: float | None = None
        """Seconds from sending the upstream request to its response headers, until a
        request answered from this fill reports it (`claim_ttfb`)."""
        self.passthrough: str | None = None
        """Why the response is not stored: its clients are relayed instead."""
        self.passes_object = False
        """A slice fill: the passthrough reason is the object's own (not storable, too
        large), not this slice's: the whole object is passed, its ranges included."""
        self.refreshed: Meta | None = None
        self.superseded = False
        """The revalidation's 304 named another version: the stored response was dropped and
        this fill fetched the object again, unconditionally."""
        self.withdrawn = False
        """The revalidation's 304 made the stored response unfit for a shared cache
        (`private`, `no-store`...): it was dropped, and its waiting clients are relayed."""
        self.published = False
        self.complete = False
        """The whole body is in the file and checked (published, or an answer not stored):
        readers may send its last byte."""
        self.shared = False
        """An answer not stored that every client waiting on the fill shares; later requests
        for the key are filled again (not passed)."""
        self.purged = False
        """A purge covered the key while it was being filled: nothing is published."""
        self.reserved = 0
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
        """A preset's metadata revalidated by every request (`revalidated`): stored with a
        lifetime of 0, whatever the upstream gives."""
        self._pinned: str | None = None
        """The digest that lets a cut body continue from another mirror (`pinned_sha256`)."""
        self.slice: tuple[int, int, str | None] | None = None
        """A slice fill: (first byte, last byte, the validator it must carry or None)."""
        self.total: int | None = None
        """A slice fill: the whole object's length, from Content-Range."""
        self.object_key = ""
        """A slice fill: the storage key of the object it is a slice of."""
        self._content_sha256: str | None = None
        """A slice fill: the SHA-256 the 206's Content-Digest announces for its bytes."""
        self._opening = False
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

    @property
    def using_upstream(self) -> bool:
        """Holding (or opening) an upstream response: stopping it frees a connection."""
        return (
            self._opening
            or self._response is not None
            or self.open_answer is not None
            or (self.overflow is not None and self.overflow.offered)
        )

    def _clientless(self) -> None:
        self._owner.fill_lost_clients(self)

    # ---- the fetch ----------------------------------------------------------------------

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
                    while self.open_answer is not None and self.clients.any:
                        await self._advance.wait()  # until a client takes it, or none is left
                return
            # The response whose body is stored (a 304 naming another version was followed
            # by the object's unconditional fetch: `_not_modified`).
            response = self._response
            assert response is not None
            fd, self.read_fd = await open_partial(self._owner.executor, self._store, self.partial)
            self.headers_ready.set()
            try:
                await self._write_body(response, fd)
            except Overflow as over:
                # Not stored: the live response is the hand-over's now, which gives it to a
                # reader or closes it (its response is the one the fill held).
                self._response = None
                self.overflow = HandOver(
                    over.rest,
                    response,
                    upstream=self._upstream,
                    request=self._request,
                    route=self._route,
                )
                self._notify()
                await self.overflow.offer(lambda: self.clients.readers)
                return
            # The whole body is in: its connection goes back before the fsync and publish.
            self._body_done = True
            await self._close_response()
            await self._publish(fd, response.headers)
        except asyncio.CancelledError:
            if not self.stopped_by_cache():
                raise
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
                if not self.clients.any:
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
        self.upstream_mirror = mirror_place(response)
        received = self._clock.now()
        if status == 304 and self.revalidating is not None and not self.superseded:
            return await self._not_modified(response, received)
        if self.slice is not None:
            if self.revalidating is not None and not self.superseded and status in (200, 206):
                # A body, not a 304: the stale slices are another version (or no longer
                # trusted). An error says nothing of the object: they are kept, still stale.
                self._owner.fill_replaced(self)
            return await self._take_slice(response, received)
        verdict = storable.whole(
            self._route,
            self.key,
            status,
            response.headers,
            max_object_bytes=self._max_object_bytes,
            content_addressed=self.sha256 is not None,
            has_clients=self.clients.any,
            room=self._room,
        )
        if verdict.reason is not None:
            self.passthrough = verdict.reason
            self.shared = verdict.answers == "all"
            self.for_one = verdict.answers == "one"
            if verdict.action == "close":
                await self._close_response()
                return False
            if verdict.action == "keep_open":
                await self._keep_open(verdict.rules)
                return False
        self.length = verdict.length
        self.meta = storable.whole_meta(
            verdict,
            response,
            key=self.key,
            url=self._url,
            variant=self.variant,
            received=received,
            immutable=self._immutable(response.headers),
            routes=self._owner.routes,
        )
        self._lifetime(self.meta)
        return True

    def _room(self, size: int) -> bool:
        return self._owner.reserve(self, size)

    def _lifetime(self, meta: Meta) -> None:
        if self.revalidate:
            meta.lifetime = 0.0

    def _immutable(self, headers: httpx.Headers) -> bool:
        return storable.is_immutable(self._route, self.immutable, headers)

    @property
    def _url(self) -> str:
        """The URL a stored object records (its query left out)."""
        return str(self._request.url.copy_with(query=None))

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
            self._owner.fill_replaced(self)
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
        meta = storable.refreshed(
            old,
            headers,
            received,
            key=self.key,
            route=self._route,
            declared_immutable=self.immutable,
        )
        if isinstance(meta, str):
            self.passthrough = meta
            self.withdrawn = True
            self._owner.fill_replaced(self)
            return False
        self._lifetime(meta)
        self._owner.fill_refreshed(self, meta)
        self.refreshed = meta
        return False

    def _unconditional(self) -> httpx.Request:
        """This fill's request without its conditions (a slice's Range stays)."""
        headers = [
            (name, value)
            for name, value in self._request.headers.multi_items()
            if name.lower() not in ("if-none-match", "if-modified-since", "if-range")
        ]
        request = self._upstream.build_request("GET", self._request.url, headers, self._route)
        return authorized_as(request, self._request)  # a registry's token renewed as before

    async def _keep_open(self, rules: httpx.Headers) -> None:
        """An answer not stored that the file cannot hold from its head on: the open response
        the fill holds is kept for the first client that takes it (a content-addressed
        object's is closed: each client asks the Hub again)."""
        if self.sha256 is not None:
            await self._close_response()
            return
        self._varies_on_encoding = vary_of(rules) == "accept-encoding"
        self.open_answer, self._response = self._response, None

    async def _take_slice(self, response: httpx.Response, received: float) -> bool:
        """Whether a slice's answer is stored (`relay.cache.storable.slice_`); if not, records
        why and closes it."""
        assert self.slice is not None
        verdict = storable.slice_(
            self.slice,
            response.status_code,
            response.headers,
            max_object_bytes=self._max_object_bytes,
            sha256=self.sha256,
            room=self._room,
        )
        self.passes_object = verdict.passes_object
        self._content_sha256 = verdict.content_sha256
        if verdict.reason is not None:
            self.passthrough = verdict.reason
            await self._close_response()
            return False
        assert verdict.content_range is not None
        self.length = verdict.length
        self.total = verdict.content_range.total
        self.meta = storable.slice_meta(
            verdict,
            response,
            key=self.key,
            url=self._url,
            first=self.slice[0],
            received=received,
            immutable=self._immutable(response.headers),
        )
        self._lifetime(self.meta)
        return True

    async def _write_body(self, first: httpx.Response, fd: int) -> None:
        """Write the body of `first`, resuming it (each resumed response replacing the one the
        fill holds) when the upstream cuts it."""
        response = first
        plan: Continuation | None = None
        retries = Retries(self._owner.config.resume_attempts, STREAM_BACKOFF)
        self._hash = hashlib.sha256()
        while True:
            try:
                chunks = response.aiter_raw()
                async for chunk in chunks:
                    size = len(chunk)
                    over = self.length is None and not self._owner.reserve(self, size)
                    if over:
                        # Never stored; this chunk is kept (one past the reservation) and
                        # the rest goes to the readers from the upstream: never a cut body.
                        too_large = self.written + size > self._max_object_bytes
                        self.passthrough = storable.TOO_LARGE if too_large else "no room"
                        self.shared = False  # later requests are relayed (pass)
                    if self.length is not None and self.written + size > self.length:
                        raise TransferAborted("upstream sent more than its Content-Length")
                    # One hop per chunk: written and hashed on the cache's thread.
                    await write_at(self._owner.executor, fd, chunk, self.written, self._hash)
                    self.written += size
                    self._owner.count_upstream(size)
                    self._notify()
                    if over:
                        assert response is self._response  # the one the fill holds
                        raise Overflow(Rest(response, chunks))
                    self._check_idle()
                break
            except httpx.HTTPError as exc:
                if plan is None and self._owner.config.resume_attempts:
                    # A whole object named by its digest, verified before it completes.
                    pinned = self.sha256 if self.slice is None else None
                    plan = Continuation.for_response(first, pinned=pinned)
                    if self.slice is None and first.status_code == 200:
                        url, headers = first.request.url, first.headers
                        self._pinned = pinned_sha256(self._route, url.path, headers, self.sha256)
                if plan is None or not retries.fail():
                    raise TransferAborted(f"upstream body failed: {exc}") from exc
                response = await self._resume(plan, response.request, retries)
        if self.length is not None and self.written != self.length:
            raise TransferAborted(f"short body: {self.written} of {self.length} bytes")

    def _check_idle(self) -> None:
        if not self.clients.any and (self.passthrough is not None or self.purged):
            raise FillAbandoned("no client left for an answer that is not stored")
        idle = self._clock.monotonic() - self.clients.idle_since  # -inf with a client
        if not self.prefetch and idle > self._owner.config.cache_fill_idle_timeout:
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
            mark_continuation(request, self._pinned, failed)
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
        # A digest the path names (Debian by-hash) before any the upstream announces.
        named = self.sha256 or named_sha256(self._route, self._request.url.path)
        expected = (
            (named or upstream_sha256(headers) or linked_sha256(headers) or self._pinned)
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
            self._owner.disk.submit([self.key], publish, fd, self._store, self.partial, meta)
        )
        self.complete = True
        if self.purged:
            # Purged while it was being published: what was just written goes too.
            data = self._store.published_path(self.partial)
            entry = Entry(self.key, data, meta)
            await asyncio.shield(self._owner.disk.submit([self.key], self._store.remove, entry))
            return
        self.published = True
        self._owner.fill_stored(self, meta)


class DigestMismatch(OSError):
    """The completed body does not match the digest the upstream announced."""


__all__ = ["DigestMismatch", "Fill", "FillAbandoned"]
