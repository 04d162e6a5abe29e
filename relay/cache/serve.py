"""The response of a cached route: a hit streamed from the object's file, or a miss streamed
from the fill's file as the fill advances (every attached client from the first byte).

`CachedResponse` holds the request's stream slot and watches for its client leaving; what to
do is `relay.cache.plan`'s decision, how it goes out `relay.cache.delivery`'s, answers from
slices `relay.cache.slice_answer`'s. A fresh hit of at most `INLINE_READ` bytes takes a
shorter path (`_small_hit`): one read on the loop, its head and body in one write.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable

import httpx
from starlette.responses import Response

from relay.cache import plan
from relay.cache.cache import Cache, FillOrder
from relay.cache.delivery import INLINE_READ, Delivery
from relay.cache.fill import Fill
from relay.cache.heads import head, parsed
from relay.cache.holds import Holds
from relay.cache.index import Entry
from relay.cache.plan import Step
from relay.cache.policy import Answer, answer
from relay.cache.slice_answer import SlicedAnswer
from relay.config import Route
from relay.errors import error_response
from relay.proxy.admission import StreamLimiter, hand_over
from relay.proxy.exchange import Exchange, exchange_of
from relay.proxy.send_watch import ClientWatch
from relay.proxy.streaming import Relayed
from relay.types import RESET_KEY, ZERO_COPY_SEND, RawHeaders, Receive, Scope, Send

# Client headers that make a stored 200 answer something other than the whole object.
_SHAPING = frozenset({b"range", b"if-none-match", b"if-modified-since"})


# A stored object's plans that answer from its bytes at once.
_FROM_STORED = frozenset({Step.HIT, Step.STALE_WHILE_REVALIDATE})


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
        fallback: Relayed,
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
        self._asked = plan.Asked(method, base, variant, route, request, client_headers, sha256)
        self._adapt = adapt
        self._fallback = fallback
        self._limiter = limiter
        self._client = client
        self._send_timeout = send_timeout
        self._exchange = Exchange()
        self._holds = Holds()
        self._slot_held = False
        self.status_code = 0

    def take_slot(self) -> None:
        """Be handed the stream slot of a request already admitted (the Hub path's; see
        `relay.proxy.admission.TakesSlot`)."""
        self._slot_held = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = self._exchange = exchange_of(scope)
        out = Delivery(
            send,
            self._cache,
            method=self._asked.method,
            client_headers=self._asked.client_headers,
            exchange=exchange,
            send_timeout=self._send_timeout,
            zero_copy=ZERO_COPY_SEND in (scope.get("extensions") or ()),
            reset=scope.get(RESET_KEY),
            adapt=self._adapt,
            path=scope.get("path", ""),
        )
        if not self._slot_held:
            refusal = self._limiter.acquire(self._client)
            if refusal is not None:
                exchange.outcome = "rejected"
                await error_response(refusal)(scope, receive, send)
                return
        relayed: Response | None = None
        try:
            try:
                # Its only wait is the server's send (the socket draining the previous
                # answer): bounded as every send of a hit is.
                async with asyncio.timeout(self._send_timeout):
                    small = await self._small_hit(out, send)
            except TimeoutError:
                out.client_stopped()
            if small:
                return
            task = asyncio.current_task()
            assert task is not None
            watch = ClientWatch(receive, task)
            try:
                relayed = await self._answer(out)
            except asyncio.CancelledError:
                cut = out.cut(task)
                if cut is not None:
                    raise cut from None
                if not watch.gone:
                    raise
                task.uncancel()
                exchange.outcome = "client_abort"
            finally:
                watch.stop()
        except OSError:
            exchange.outcome = "client_abort"
        finally:
            out.close()
            self._holds.release()
            # A request relayed instead keeps its slot: the relayed response is handed it
            # (and releases it), so it is never refused halfway.
            if relayed is None or not hand_over(relayed):
                self._limiter.release(self._client)
            if out.status:
                self.status_code = out.status
        if relayed is not None:
            if exchange.cache == "-":
                exchange.cache = "pass"
            await relayed(scope, receive, send)

    async def _small_hit(self, out: Delivery, send: Send) -> bool:
        """A fresh hit whose body (if any) is at most `INLINE_READ` bytes: read on the loop
        and sent with the head in one message. Nothing in it waits on anything but the
        server's send, so it needs no disconnect watcher (the watcher could only run once the
        answer is out) and no back-pressure wait: what is sent is all there is. Anything
        else (stale, a fill, a bigger body) is left to `_answer`; False then."""
        asked = self._asked
        method = asked.method
        if (method != "GET" and method != "HEAD") or asked.sha256 is not None:
            # A content-addressed object's answers carry this request's adapted headers and
            # no ttl: `_answer` makes them.
            return False
        cache = self._cache
        entry = cache.lookup(asked.base, asked.variant)
        if entry is None or not entry.verified:
            return False  # unverified: `_answer` checks it first
        hit = parsed(entry)
        meta = hit.meta
        age = plan.age_of(meta, cache.clock.now())
        status = plan.fresh_hit(
            must_revalidate=hit.must_revalidate, age=age, lifetime=meta.lifetime
        )
        if status is None:
            return False
        client_headers = asked.client_headers
        length = meta.length
        # One pass over the names: `name in headers` for each would raise and catch a
        # KeyError per absent header (most requests carry none of them).
        if any(name.lower() in _SHAPING for name, _ in client_headers.raw):
            reply = answer(client_headers, hit.headers, length)
        else:
            reply = Answer(200, 0, length)
        body = b""
        if method == "GET" and reply.status in (200, 206):
            want = reply.stop - reply.start
            if want > INLINE_READ:
                return False
            if want:
                try:
                    fd = os.open(hit.data, os.O_RDONLY)
                except OSError:
                    fd = -1
                if fd >= 0:
                    try:
                        body = os.pread(fd, want, reply.start)
                    finally:
                        os.close(fd)
                if len(body) != want:
                    # Gone (another worker evicted or purged it, or an outside hand removed
                    # it): nothing was sent; the lookup that follows finds a miss.
                    if cache.index.peek(entry.key) is entry:
                        cache.index.remove(entry.key)
                    return False
        # What Delivery.answered does, inline on the busiest path: a fresh hit (its
        # Cache-Status is plan.fresh_hit's) is logged and counted as a hit.
        exchange = self._exchange
        exchange.cache = "hit"
        stats = cache.stats
        stats.hits += 1
        stats.bytes_from_cache += len(body)
        if reply.status not in (200, 206):
            await out.start(meta, reply, status, age, length)
            await out.end()
            return True
        headers = head(meta, reply, total=length, age=age, status=status, whole=hit.head)
        out.status = reply.status
        exchange.bytes_counted = True
        exchange.bytes_sent = len(body)
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})
        return True

    async def _answer(self, out: Delivery) -> Response | None:
        """Answer as the plan says; the relayed response when the cache does not take it. The
        stored version looked up is pinned until the answer is over: its bytes stay those its
        head describes whatever is published, evicted or purged meanwhile."""
        cache = self._cache
        entry = cache.lookup(self._asked.base, self._asked.variant)
        with cache.pinned(entry):
            return await self._answer_from(out, entry)

    async def _answer_from(self, out: Delivery, entry: Entry | None) -> Response | None:
        asked = self._asked
        cache = self._cache
        if entry is not None and asked.sha256 is not None and entry.meta.sha256 != asked.sha256:
            cache.drop(entry.key)  # never expected: stored only once verified against its key
            entry = None
        # Bytes not trusted yet (loaded with a known digest): only a whole answer from byte 0
        # hashes as it sends; another waits for the object's check, a miss if it dropped it.
        if (
            entry is not None
            and not entry.verified
            and not self._whole_from_start(entry)
            and not await cache.verifier.entry(entry)
        ):
            entry = None
        stored = None
        if entry is not None:
            now = cache.clock.now()
            stored = plan.for_stored(entry.meta, now, content_addressed=asked.sha256 is not None)
        if entry is not None and stored is not None and stored.step in _FROM_STORED:
            fd = out.open(entry)
            if fd is None:
                # Gone between the lookup and here (another worker evicted or purged it, or
                # an outside hand removed it; out.open dropped it): nothing was sent, so it
                # is answered as the miss it now is, never as a short or foreign body.
                entry = None
            else:
                try:
                    if stored.step is Step.STALE_WHILE_REVALIDATE:
                        # Nobody waits for this revalidation: not started when fills
                        # without a client are at their limit (the next request tries again).
                        cache.background_fill(self._order(entry))
                    await out.from_file(fd, entry.meta, stored, entry=entry)
                finally:
                    os.close(fd)
                return None
        if entry is not None and stored is not None:
            assert stored.stored is not None
            # The stored bytes this request asked about, held while it waits: if the
            # upstream confirms them (or fails and allows them stale), they answer it,
            # whatever a purge or an eviction did to the entry meanwhile (a purge stands for
            # later requests; a request already waiting is answered as one already
            # streaming the object is).
            pinned = out.open(entry)
            try:
                fill = await self._holds.take(lambda: cache.fill(self._order(entry)))
                await fill.headers_ready.wait()
                then = plan.after_revalidation(
                    stored.stored,
                    refreshed=fill.refreshed is not None,
                    failure=fill.upstream_failure,
                    route_stale_if_error=asked.route.cache_stale_if_error,
                    superseded=fill.superseded,
                    withdrawn=fill.withdrawn,
                )
                if then.step is Step.PASS:
                    return self._fallback()
                if then.step is Step.REVALIDATED:
                    assert fill.refreshed is not None
                    out.upstream(fill)
                    await out.from_file(pinned, fill.refreshed, then, entry=entry)
                    return None
                if then.step is Step.STALE_IF_ERROR:
                    out.upstream(fill)
                    await out.from_file(pinned, entry.meta, then, entry=entry)
                    return None
            finally:
                if pinned is not None:
                    os.close(pinned)
            return await self._from_fill(out, fill, then)
        filling = cache.fill_in_flight(asked.base, asked.variant)
        absent = plan.for_absent(
            method=asked.method,
            ranged="range" in asked.client_headers,
            filling=filling is not None,
            passing=cache.passing(cache.storage_key(asked.base, asked.variant)),
            sliced=cache.slices.has(asked.base, asked.variant),
        )
        if absent.step is Step.SLICES:
            return None if await self._sliced(out).range() else self._fallback()
        if absent.step is Step.FROM_SLICES:
            if await self._sliced(out).whole():
                return None
            absent = plan.for_absent(
                method=asked.method, ranged=False, filling=False, passing=False, sliced=False
            )
        if absent.step is Step.PASS:
            return self._fallback()
        fill = await self._holds.take(lambda: cache.fill(self._order(sha256=asked.sha256)))
        return await self._from_fill(out, fill, absent)

    def _order(self, revalidating: Entry | None = None, sha256: str | None = None) -> FillOrder:
        """The fill of what this request asked for, with a request built from its key."""
        asked = self._asked
        return FillOrder(
            asked.base, asked.variant, asked.fill_request(), asked.route, revalidating, sha256
        )

    def _whole_from_start(self, entry: Entry) -> bool:
        """Whether the answer from `entry` is its whole body from byte 0 (a GET's 200)."""
        asked = self._asked
        if asked.method != "GET":
            return False
        headers = parsed(entry).headers
        return answer(asked.client_headers, headers, entry.meta.length).status == 200

    async def _from_fill(self, out: Delivery, fill: Fill, report: plan.Plan) -> Response | None:
        """Answer from `fill` (held since this response joined it, so its body stays readable):
        whatever the upstream said, where that answer is this client's too (`Fill.claim`); an
        answer the fill could not hold, relayed from its open response if this client takes it
        (`Fill.take_response`); else the relayed response."""
        await fill.headers_ready.wait()
        if fill.error is not None:
            await out.upstream_error(fill.error)
            return None
        if self._asked.method == "GET" and "range" not in self._asked.client_headers:
            opened = fill.take_response(self._asked.variant)
            if opened is not None:
                return self._fallback(opened)
        meta = fill.meta
        if meta is None or not fill.claim(self._asked.variant):
            return self._fallback()
        if not await out.from_fill(fill, meta, report):
            return self._fallback()
        return None

    def _sliced(self, out: Delivery) -> SlicedAnswer:
        return SlicedAnswer(self._cache, out, self._asked, self._holds)
