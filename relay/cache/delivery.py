"""The way out of a cached answer: its body pumps, after its head (built by `relay.cache.heads`);
its error answers; its abort.

A complete object (a hit, a range of one, a stored slice) of more than `INLINE_READ` bytes goes
out zero-copy when the server offers the ASGI Zero Copy Send extension (relay's own protocol
does on plain TCP: relay/server/zerocopy.py): `sendfile` from the file to the socket, `CHUNK`
bytes per message (`FAST_CHUNK` once the client proves fast), each under `send_timeout`;
nothing is read into Python. A smaller body is read on the loop and leaves with its head in one
write, cheaper than a head write and a sendfile. Elsewhere (another server, TLS) and for a body
still being filled (it waits on the fill), reads are `os.pread` of the same sizes on the
cache's threads (`relay.cache.executor`): a slow client holds one small chunk, and waits on
the server's back-pressure before the next read. An object loaded with a known digest and not
verified yet (`relay.cache.integrity`) is never sent zero-copy: a whole answer from byte 0
reads it, hashing each chunk in the read's own job, and sends its last chunk only if the
digest matches; an answer from an object found corrupt meanwhile aborts.

Every pump sizes its chunks with one `_ChunkSize` paced by `ReadPacer`, and sends each read
chunk through `_send_chunk`.

A client is cut by the rules relayed streams follow: one that stops reading for `send_timeout`
(each send waits at most that), and, with `min_send_rate`, one that reads too slowly: every
pump of an answer (zero-copy, reads of a stored file, reads behind a fill, slice after slice)
counts what it sends and how long it waits for the client in one `SendWatchdog`
(relay/proxy/send_watch.py), which judges the rate per `min_rate_window` and cancels the
request's task; `CachedResponse` turns that into the cut (`Delivery.cut`). Waiting on a fill
(a slow upstream) is not waiting for the client.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

import httpx

from relay.cache import plan
from relay.cache.fill import Fill
from relay.cache.heads import head
from relay.cache.index import Entry
from relay.cache.plan import Plan
from relay.cache.policy import Answer, answer, current_age
from relay.cache.store import Meta
from relay.errors import TransferAborted, UpstreamError, error_response
from relay.proxy.exchange import Exchange
from relay.proxy.pacing import ReadPacer
from relay.proxy.send_watch import SendWatchdog
from relay.types import WAIT_FOR_CLIENT, ZERO_COPY_SEND, RawHeaders, Send

if TYPE_CHECKING:
    from _hashlib import HASH

    from relay.cache.cache import Cache

logger = logging.getLogger(__name__)

CHUNK = 64 * 1024
# A client that takes bytes faster than pacing.FAST_RATE gets reads of this size instead: as
# for relayed streams, a slow client holds one small chunk, a fast one costs few reads per GiB.
FAST_CHUNK = 1024 * 1024
# Reads up to this size are made on the loop: a thread hop costs more than reading a few KiB
# of a recently written file, and small objects are most of a hit rate.
INLINE_READ = 16 * 1024


def _stored(report: Plan) -> Plan:
    """The report of an answer whose head goes out once its fill published the object."""
    return dataclasses.replace(report, cache_status=report.cache_status + "; stored")


# ---- pacing ---------------------------------------------------------------------------------


class _ChunkSize:
    """The read size of one body pump, set by its `ReadPacer` from the client's rate."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = CHUNK

    def __call__(self, small: bool) -> None:
        self.value = CHUNK if small else FAST_CHUNK


# ---- one answer's way out -------------------------------------------------------------------


class Delivery:
    """Sends one cached answer: its head, its body from a file or a fill, or an error; cuts
    the client connection when the body cannot be completed. `status`: the status sent."""

    __slots__ = (
        "_adapt",
        "_cache",
        "_client_headers",
        "_method",
        "_path",
        "_reset",
        "_send",
        "_send_timeout",
        "_watchdog",
        "exchange",
        "status",
        "zero_copy",
    )

    def __init__(
        self,
        send: Send,
        cache: Cache,
        *,
        method: str,
        client_headers: httpx.Headers,
        exchange: Exchange,
        send_timeout: float,
        zero_copy: bool,
        reset: Callable[[], None] | None,
        adapt: Callable[[RawHeaders], RawHeaders] | None,
        path: str = "",
    ) -> None:
        """`path`: the request's, for the log line of a cut."""
        self._send = send
        self._cache = cache
        self._method = method
        self._client_headers = client_headers
        self.exchange = exchange
        self._send_timeout = send_timeout
        self.zero_copy = zero_copy
        self._reset = reset
        self._adapt = adapt
        self._path = path
        self._watchdog: SendWatchdog | None = None
        self.status = 0

    # ---- what the answer is ---------------------------------------------------------------

    def answered(self, outcome: str) -> None:
        """The answer is the cache's `outcome` (`relay.cache.plan.Plan.outcome`): the access
        line says so and the cache's counters count it, once."""
        self.exchange.cache = outcome
        self._cache.stats.answered(outcome)

    def upstream(self, fill: Fill) -> None:
        """The answer is made from (or after) `fill`'s upstream response: the access line
        reports its status, and its time to first byte if no other request reported it (the
        metrics count each upstream request once; a client that joined the fill waited for
        no request of its own)."""
        exchange = self.exchange
        if exchange.upstream_status is None:
            exchange.upstream_status = fill.upstream_status
            exchange.upstream_mirror = fill.upstream_mirror
            exchange.upstream_ttfb = fill.claim_ttfb()

    # ---- heads ----------------------------------------------------------------------------

    async def start(self, meta: Meta, reply: Answer, status: str, age: float, total: int) -> None:
        headers = head(meta, reply, total=total, age=age, status=status, adapt=self._adapt)
        await self.send_head(reply.status, headers)

    async def send_head(self, status: int, headers: RawHeaders) -> None:
        """Send the head; the body that follows is counted as it goes out."""
        self.status = status
        self.exchange.bytes_counted = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": b"", "more_body": False})

    async def send_body(self, body: bytes | memoryview) -> None:
        """The whole body, in one message."""
        self.exchange.bytes_sent += len(body)
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def error(self, status: int, text: str) -> None:
        """A short plain-text answer of relay's own."""
        body = f"{status} {text}\n".encode()
        headers = [
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode()),
        ]
        await self.send_head(status, headers)
        await self.send_body(body)

    async def upstream_error(self, error: UpstreamError) -> None:
        """The fill could not reach the upstream: answered as a relayed request would be."""
        self.exchange.outcome = "upstream_error"
        failure = error_response(error)
        await self.send_head(failure.status_code, failure.raw_headers)
        await self.send_body(failure.body)

    # ---- whole answers --------------------------------------------------------------------

    def open(self, entry: Entry) -> int | None:
        """A descriptor of the stored object's data (None if it is gone): whoever holds it
        answers from these bytes whatever happens to the entry meanwhile (files are unlinked
        or replaced, never truncated)."""
        try:
            return os.open(self._cache.store.data_path(entry), os.O_RDONLY)
        except OSError:
            # Evicted or purged between the lookup and here (both run on this loop, so only
            # an outside hand can do this): the entry is dropped from the index.
            if self._cache.index.peek(entry.key) is entry:
                self._cache.index.remove(entry.key)
            return None

    async def from_file(
        self, fd: int | None, meta: Meta, report: Plan, *, entry: Entry | None = None
    ) -> None:
        """Answer from stored bytes (`fd`, from `open`; None: they were gone: say so rather
        than guess) described by `meta`; `entry`: the stored object they are (checked against
        its digest if it is unverified; the answer aborts if it is found corrupt)."""
        if fd is None:
            await self.error(503, "cached object unavailable, retry")
            return
        reply = answer(self._client_headers, httpx.Headers(meta.headers), meta.length)
        body = reply.status in (200, 206) and self._method == "GET"
        digest = None
        if entry is not None and not entry.verified:
            # Loaded with a known digest and not hashed since (relay.cache.integrity).
            if body and reply.status == 200:
                digest = hashlib.sha256()  # hashed as it is sent, its last chunk held
            elif not await self._cache.verifier.entry(entry):
                await self.error(503, "cached object unavailable, retry")
                return
        self.answered(report.outcome)
        age = current_age(meta.initial_age, meta.stored_at, self._cache.clock.now())
        await self.start(meta, reply, report.cache_status, age, meta.length)
        if body:
            await self.stream(fd, reply.start, reply.stop, None, entry=entry, digest=digest)
        else:
            await self.end()

    async def from_fill(self, fill: Fill, meta: Meta, report: Plan) -> bool:
        """Answer from a fill as it advances (its last byte held back until the body is whole
        and checked), read through its `read_fd` (the caller holds the fill); False when it
        has no body to read. Its Cache-Status says `stored` only when the head goes out after
        the fill published the object; an answer the fill will not store keeps the upstream's
        status, and says so (`fwd-status=N`)."""
        fd = fill.read_fd
        if fd is None:
            return False
        self.answered(report.outcome)
        self.upstream(fill)
        fill.clients.attach()
        try:
            length = fill.length
            if meta.status != 200:  # an answer not stored: relayed as the upstream said
                reply = Answer(meta.status, 0, -1 if length is None else length)
            else:  # conditionals and ranges (unsized fills too: `answer`)
                reply = answer(self._client_headers, httpx.Headers(meta.headers), length)
            if fill.passthrough is not None or fill.purged:  # known not to be stored
                status = plan.fill_status(report.cache_status, stored=False, fwd_status=meta.status)
            elif fill.published:
                status = _stored(report).cache_status
            else:
                status = report.cache_status
            await self.start(meta, reply, status, 0.0, length or 0)
            body = reply.status in (200, 206) or reply.status == meta.status
            if body and self._method == "GET":
                await self.stream(fd, reply.start, reply.stop, fill)
            else:
                await self.end()
        finally:
            fill.clients.detach()
        return True

    # ---- body pumps -----------------------------------------------------------------------

    async def stream(
        self,
        fd: int,
        start: int,
        stop: int,
        fill: Fill | None,
        *,
        end: bool = True,
        entry: Entry | None = None,
        digest: HASH | None = None,
    ) -> None:
        """Send bytes [start, stop) of the file (stop -1: to the end of an unsized fill).
        `entry`: the stored object read (the transfer aborts if it is found corrupt
        meanwhile); `digest`: the whole object is sent from byte 0 unverified: hashed as it is
        read (in the read's own job), its last chunk sent only if it matches."""
        if fill is None and digest is None and self.zero_copy and stop - start > INLINE_READ:
            # A small body read on the loop leaves with its head in one write: cheaper than
            # writing the head, then a sendfile.
            await self.send_file(fd, start, stop, end=end, entry=entry)
            return
        loop = asyncio.get_running_loop()
        position = start
        sent = 0
        relayed = False
        stats = self._cache.stats
        size = _ChunkSize()
        pacer = ReadPacer(size, loop.time())
        watch = self._watch(loop)
        try:
            while stop < 0 or position < stop:
                if fill is not None and fill.complete and stop < 0:
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
                if fill is not None and not fill.complete and held >= 0 and position >= held - 1:
                    await fill.wait_finished()
                    if not fill.complete:
                        self.abort(f"cache fill failed: {fill.failed}")
                if fill is not None and not fill.complete:
                    await fill.wait_beyond(position)
                    if fill.written <= position:
                        if fill.complete and stop < 0:
                            continue
                        if fill.overflow is not None and stop < 0:
                            # Too large to store: the rest comes from the upstream.
                            sent += await self._rest(fill, position, watch)
                            relayed = True
                            break
                        self.abort(f"cache fill failed: {fill.failed}")
                    available = fill.written
                    if held >= 0 and not fill.complete:
                        available = min(available, held - 1)
                else:
                    available = stop
                want = min(size.value, available - position)
                if stop >= 0:
                    want = min(want, stop - position)
                if want <= INLINE_READ:
                    chunk = _read(fd, want, position, digest)
                else:
                    chunk = await self._cache.executor.run(_read, fd, want, position, digest)
                if not chunk:
                    self.abort("cached file shorter than its meta")
                if entry is not None:
                    if entry.corrupt:
                        self.abort("the cached object does not match its digest")
                    if digest is not None and position + len(chunk) == stop:
                        self._judge(entry, digest)
                position += len(chunk)
                sent += len(chunk)
                if fill is None:
                    stats.bytes_from_cache += len(chunk)
                pacer.sent(len(chunk), loop.time())
                await self._send_chunk(chunk, loop, watch)
        except TimeoutError:
            self.client_stopped()
        finally:
            self.exchange.bytes_sent += sent
        if fill is not None and not fill.complete and not relayed:
            # The last bytes are out only once the object is verified and stored.
            await fill.wait_finished()
            if not fill.complete:
                self.abort(f"cache fill failed: {fill.failed}")
        if end:
            await self.end()

    def _judge(self, entry: Entry, digest: HASH) -> None:
        """The whole object was read and hashed: verified, or dropped and the transfer
        aborted before its last chunk."""
        actual = digest.hexdigest()
        if actual == entry.meta.sha256:
            entry.verified = True
            return
        if not entry.corrupt:
            self._cache.corrupted([entry], actual, entry.meta.sha256 or "")
        self.abort("the cached object does not match its digest")

    async def _rest(self, fill: Fill, position: int, watch: SendWatchdog | None) -> int:
        """The rest of an overflowed fill's body after `position` (all it wrote), from the
        upstream: its live response if no other reader took it, else a continuation of this
        reader's own (Range + If-Range); aborted when neither can be had. Bytes sent, counted
        by the answer's rate watchdog as the pump's own (waiting on the upstream is not
        waiting for the client)."""
        hand_over = fill.overflow
        assert hand_over is not None
        rest = hand_over.take() or await hand_over.continue_at(position)
        if rest is None:
            self.abort("too large to store, and the body cannot be continued from the upstream")
        loop = asyncio.get_running_loop()
        stats = self._cache.stats
        sent = 0
        try:
            async for chunk in rest.chunks:
                sent += len(chunk)
                stats.bytes_from_upstream += len(chunk)
                await self._send_chunk(chunk, loop, watch)
        except httpx.HTTPError as exc:
            self.abort(f"upstream body failed: {exc}")
        finally:
            await asyncio.shield(rest.aclose())
        return sent

    async def _send_chunk(
        self, chunk: bytes, loop: asyncio.AbstractEventLoop, watch: SendWatchdog | None
    ) -> None:
        """Send one chunk of the body and wait until the client took it (at most
        `send_timeout`: TimeoutError), the wait counted by the answer's rate watchdog."""
        now = loop.time()
        if watch is not None:
            watch.sent += len(chunk)
            watch.sending_since = now
        await self._send({"type": "http.response.body", "body": chunk, "more_body": True})
        async with asyncio.timeout(self._send_timeout):
            await self._send(WAIT_FOR_CLIENT)
        if watch is not None:
            watch.sending_since = None
            watch.client_wait += loop.time() - now

    async def send_file(
        self, fd: int, start: int, stop: int, *, end: bool, entry: Entry | None = None
    ) -> None:
        """Send bytes [start, stop) of a complete file with the server's zero-copy send."""
        send = self._send
        loop = asyncio.get_running_loop()
        stats = self._cache.stats
        position = start
        size = _ChunkSize()
        pacer = ReadPacer(size, loop.time())
        watch = self._watch(loop)
        message = {"type": ZERO_COPY_SEND, "file": fd, "offset": 0, "count": 0, "more_body": True}
        try:
            while position < stop:
                count = min(size.value, stop - position)
                if entry is not None and entry.corrupt:
                    self.abort("the cached object does not match its digest")
                message["offset"] = position
                message["count"] = count
                if watch is not None:
                    watch.sent += count
                    watch.sending_since = since = loop.time()
                try:
                    async with asyncio.timeout(self._send_timeout):
                        await send(message)
                except EOFError:
                    self.abort("cached file shorter than its meta")
                if watch is not None:
                    watch.sending_since = None
                    watch.client_wait += loop.time() - since
                position += count
                stats.bytes_from_cache += count
                stats.bytes_zero_copy += count
                pacer.sent(count, loop.time())
        except TimeoutError:
            self.client_stopped()
        finally:
            self.exchange.bytes_sent += position - start
        if end:
            await self.end()

    # ---- cutting the client ---------------------------------------------------------------

    def _watch(self, loop: asyncio.AbstractEventLoop) -> SendWatchdog | None:
        """The answer's one rate watchdog (started by its first pump), with min_send_rate."""
        watchdog = self._watchdog
        if watchdog is None:
            config = self._cache.config
            if not config.min_send_rate:
                return None
            task = asyncio.current_task()
            assert task is not None
            # Stalls are cut by each send's own send_timeout; this judges the rate only.
            watchdog = SendWatchdog(math.inf, config.min_send_rate, config.min_rate_window)
            watchdog.start(loop, task)
            self._watchdog = watchdog
        return watchdog

    def cut(self, task: asyncio.Task[object]) -> TransferAborted | None:
        """Called where the answer's task caught a CancelledError: the cut to raise when the
        rate watchdog cancelled it (see `SendWatchdog.cut`), else None."""
        watchdog = self._watchdog
        if watchdog is None:
            return None
        return watchdog.cut(task, self.exchange, self._reset, self._path)

    def close(self) -> None:
        """The answer is over (its response's `finally`): the watchdog stops."""
        if self._watchdog is not None:
            self._watchdog.stop()

    def abort(self, reason: str) -> NoReturn:
        """The body cannot be completed: the client transfer is aborted, never ended clean."""
        self.exchange.outcome = "upstream_abort"
        logger.warning("aborting the client transfer: %s", reason)
        self.reset()
        raise TransferAborted(reason)

    def client_stopped(self) -> NoReturn:
        """The client stopped reading for `send_timeout`: cut."""
        self.exchange.outcome = "client_abort"
        self.reset()
        raise TransferAborted("client stopped reading") from None

    def reset(self) -> None:
        reset = self._reset
        if reset is not None:
            reset()


def _read(fd: int, size: int, offset: int, digest: HASH | None) -> bytes:
    """Read `size` bytes at `offset`, added to `digest` when given (one job: read and hash)."""
    chunk = os.pread(fd, size, offset)
    if digest is not None:
        digest.update(chunk)
    return chunk
