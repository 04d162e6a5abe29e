"""An httpx transport that moves bytes with aiohttp's client.

Measured in bench/: aiohttp's C parser and its direct use of the event loop's protocols move a
1 GiB body at several times the speed of httpcore on anyio, for less CPU. relay keeps httpx's
API on top, so everything above this module is transport-agnostic.

Guarantees this module owns:
- one pool slot per response, released exactly once: on a failed request, or when the
  response stream is closed (normal end, client abort, upstream error, cancellation);
- a response not read to its end closes its connection; one read to the end is reused;
- the body is yielded as received (`aiter_raw`): no decompression, no re-chunking, no copy;
- a body cut short (Content-Length not reached, chunked stream without its last chunk, a
  close-delimited body ended by a reset) raises `httpx.RemoteProtocolError`, never a clean end;
- a connection that receives bytes while idle, or a second response behind a complete one, is
  closed, never reused; a complete response with other bytes right behind it (same read) is
  relayed whole, and its connection closed (aiohttp_compat's `complete_first_parser`); a
  request is sent again (by aiohttp) only if no byte of its response arrived;
- a response head is complete within the read timeout and passes relay/net/transports/heads.py,
  or the request fails (504 / 502) before anything reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import httpx
from aiohttp.http import RawResponseMessage
from aiohttp.streams import EMPTY_PAYLOAD
from yarl import URL

from relay.config import Config
from relay.net.addresses import EgressRefused, check_literal
from relay.net.egress import GuardedResolver
from relay.net.transports import ALLOW_PRIVATE, POOL_WAIT, READ_PACE, PoolStats, aiohttp_compat
from relay.net.transports.aiohttp_compat import ResponseHandler
from relay.net.transports.heads import check_head
from relay.net.transports.reads import SizedReads

logger = logging.getLogger(__name__)

# Headers aiohttp would invent; relay sends exactly the headers it chose.
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent")

# aiohttp's per-response buffer: reading pauses above twice this and resumes below it. Small, so
# that a paused stream holds about one socket read (see reads.py), not a read plus 128 KiB.
READ_BUFSIZE = 16 * 1024


class IncompleteHead(aiohttp.ClientConnectionError):
    """The upstream closed the connection in the middle of a response head.

    Not one of the errors aiohttp answers by silently sending the request again: part of a
    response arrived, so the upstream did act on this one (RFC 9112 9.3.1).
    """


class _Handler(ResponseHandler):
    """aiohttp's protocol, with socket reads sized by relay (`SizedReads`), and the rules that
    make a kept-alive connection safe to reuse:

    - a connection is idle from the end of one response until the next request; bytes
      arriving then, or a second response after a complete one, are nobody's response: the
      connection is closed, never reused (its data is dropped, not handed to the next request);
    - `sock_read` measures waiting for the upstream during a request: it never runs while idle
      (aiohttp re-arms it when a drained body resumes reading), so a connection idle longer
      than the read timeout is not failed by it;
    - a response head must be complete within the read timeout of the request being sent
      (`sock_read` alone restarts with every byte, so a head trickled a line a second never
      timed out);
    - a body delimited by closing (no length, not chunked) ends only at a clean close: a reset
      fails it.
    """

    reads: SizedReads | None = None
    # No request in flight (before the first, and after each complete response).
    idle = True
    unsolicited = False
    _awaiting_head = False
    _head_started = False
    _head_deadline: asyncio.TimerHandle | None = None
    _body: aiohttp.StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.reads = SizedReads(self)
        transport.set_protocol(self.reads)

    def set_response_params(self, *args: Any, **kwargs: Any) -> None:
        """Called by aiohttp as each request on this connection is about to be sent."""
        super().set_response_params(*args, **kwargs)
        aiohttp_compat.complete_first_parser(self, kwargs)
        self.idle = False
        self._awaiting_head = True
        self._head_started = False
        self._body = None
        timeout = kwargs.get("read_timeout")
        if timeout:
            loop = asyncio.get_running_loop()
            self._head_deadline = loop.call_later(timeout, self._head_timed_out, timeout)

    def data_received(self, data: bytes) -> None:
        if data and self.idle:
            self._drop_unsolicited("bytes arrived on an idle upstream connection")
            return
        if data and self._awaiting_head:
            self._head_started = True
        was_idle = self.idle
        super().data_received(data)
        if self.idle and not was_idle and aiohttp_compat.recovered_a_complete_first(self):
            self._drop_unsolicited("bytes that are not a response came right after a response")

    def feed_data(
        self, data: tuple[RawResponseMessage, aiohttp.StreamReader], size: int = 0
    ) -> None:
        """A parsed response head and its body, on their way to the waiting request."""
        message, payload = data
        if not self._awaiting_head:
            self._drop_unsolicited("a second response arrived after a complete one")
            return
        if 100 <= message.code < 200 and message.code != 101:
            super().feed_data(data, size)  # interim: aiohttp reads on for the final one
            return
        self._awaiting_head = False
        self._cancel_head_deadline()
        super().feed_data(data, size)
        if payload is EMPTY_PAYLOAD:
            self._response_done()
        else:
            if message.chunked or message.headers.get("content-length") is not None:
                self._body = None
            else:
                self._body = payload  # delimited by the connection's close
            payload.on_eof(self._response_done)

    def resume_reading(self, resume_parser: bool = True) -> None:
        super().resume_reading(resume_parser)
        if self.idle:
            aiohttp_compat.stop_read_timer(self)

    def start_timeout(self) -> None:
        if not self.idle:
            super().start_timeout()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_deadline()
        body = self._body
        if exc is not None and body is not None and not body.is_eof():
            # aiohttp ends a close-delimited body at any close; only a FIN is its end.
            body.set_exception(
                aiohttp.ClientPayloadError(f"connection reset before the end of the body: {exc}")
            )
        if self._awaiting_head and self._head_started and not self.is_eof():
            self.set_exception(
                IncompleteHead("connection closed in the middle of the response head")
            )
        super().connection_lost(exc)

    def _response_done(self) -> None:
        self.idle = True
        self._body = None
        aiohttp_compat.stop_read_timer(self)

    def _cancel_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self, timeout: float) -> None:
        self._head_deadline = None
        if self._awaiting_head and not self.is_eof():
            self.set_exception(
                aiohttp.SocketTimeoutError(f"no complete response head within {timeout:g}s")
            )
            self._close_transport()

    def _drop_unsolicited(self, why: str) -> None:
        if not self.unsolicited:
            logger.warning("%s; closing it", why)
        self.unsolicited = True
        self._close_transport()

    def _close_transport(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def is_connected(self) -> bool:
        return not self.unsolicited and super().is_connected()


@functools.lru_cache(maxsize=64)
def _client_timeout(connect: float | None, read: float | None) -> aiohttp.ClientTimeout:
    """aiohttp's timeouts for httpx's; relay has one pair (per config), so made once."""
    return aiohttp.ClientTimeout(total=None, connect=connect, sock_connect=connect, sock_read=read)


def _sized_reads(response: aiohttp.ClientResponse) -> SizedReads | None:
    connection = response.connection
    protocol = connection.protocol if connection is not None else None
    return protocol.reads if isinstance(protocol, _Handler) else None


@contextlib.contextmanager
def _map_aiohttp_errors(request: httpx.Request) -> Iterator[None]:
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc) or "connect timed out", request=request) from exc
    except (TimeoutError, aiohttp.SocketTimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc) or "read timed out", request=request) from exc
    except aiohttp.ClientConnectorError as exc:
        cause = exc.os_error
        if isinstance(cause, EgressRefused):
            raise httpx.ConnectError(f"refused by egress policy: {cause}", request=request) from exc
        raise httpx.ConnectError(str(exc), request=request) from exc
    except aiohttp.ServerDisconnectedError as exc:
        raise httpx.RemoteProtocolError(
            "server disconnected without sending a complete response", request=request
        ) from exc
    except aiohttp.ClientPayloadError as exc:
        raise httpx.RemoteProtocolError(f"incomplete body: {exc}", request=request) from exc
    except aiohttp.ClientResponseError as exc:
        raise httpx.RemoteProtocolError(
            f"invalid response: {exc.message}", request=request
        ) from exc
    except (aiohttp.ClientOSError, ConnectionError) as exc:
        raise httpx.ReadError(str(exc) or type(exc).__name__, request=request) from exc
    except aiohttp.ClientError as exc:
        raise httpx.RemoteProtocolError(str(exc), request=request) from exc


class _ResponseStream(httpx.AsyncByteStream):
    __slots__ = ("_closed", "_closed_future", "_release", "_request", "_response")

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        request: httpx.Request,
        release: _Release,
    ) -> None:
        self._response = response
        self._request = request
        self._release = release
        self._closed = False
        self._closed_future = self._watch_connection()

    def _watch_connection(self) -> asyncio.Future[None] | None:
        """Fail the body if its connection closes before the body is complete.

        aiohttp fails the body when the connection drops mid-body, but not when its parser
        rejects the framing after the headers (a bad chunk size): the body would then wait
        for more bytes until the read timeout. Watching the connection closes that gap.
        """
        connection = self._response.connection
        protocol = connection.protocol if connection is not None else None
        if protocol is None:
            return None  # no body on the wire (HEAD, 304) or already released
        closed = protocol.closed
        if closed is None:  # already lost
            self._fail_incomplete_body()
            return None
        closed.add_done_callback(self._on_connection_closed)
        return closed

    def _on_connection_closed(self, future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: the body carries the error
        self._fail_incomplete_body()

    def _fail_incomplete_body(self) -> None:
        content = self._response.content
        if not content.is_eof() and content.exception() is None:
            content.set_exception(
                aiohttp.ClientPayloadError("connection closed before the body was complete")
            )

    async def __aiter__(self) -> AsyncIterator[bytes]:
        readchunk = self._response.content.readchunk
        with _map_aiohttp_errors(self._request):
            while True:
                chunk, end_of_http_chunk = await readchunk()
                if chunk:
                    yield chunk
                elif not end_of_http_chunk:
                    return

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._closed_future is not None:
            # The connection may go back to the pool and be reset there later: the future's
            # exception must still be retrieved, or asyncio logs it at ERROR ("never
            # retrieved"). A plain function, so the pool holds no reference to this stream,
            # and added once per connection (it serves many responses).
            self._closed_future.remove_done_callback(self._on_connection_closed)
            self._closed_future.remove_done_callback(_retrieve_exception)
            self._closed_future.add_done_callback(_retrieve_exception)
            self._closed_future = None
        # A response read to its end has already handed its connection back for reuse; any
        # other is closed here, so a half-read connection is never pooled.
        self._response.close()
        self._release()


def _retrieve_exception(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class _Release:
    """Hands a pool slot back exactly once."""

    __slots__ = ("_done", "_transport")

    def __init__(self, transport: AiohttpTransport) -> None:
        self._transport = transport
        self._done = False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._transport._release_slot()


class AiohttpTransport(httpx.AsyncBaseTransport):
    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 30.0,
        read_bufsize: int = READ_BUFSIZE,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._max_connections = max_connections
        self._keepalive_expiry = keepalive_expiry
        self._read_bufsize = read_bufsize
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        # Two pools: one whose resolver enforces the egress policy, and one for routes that
        # opted in to private addresses (opened only if such a route is used).
        self._sessions: dict[bool, aiohttp.ClientSession] = {}
        self._slots: asyncio.Semaphore | None = None
        self._in_use = 0
        self._waiting = 0

    @classmethod
    def from_config(cls, config: Config) -> AiohttpTransport:
        return cls(
            max_connections=config.max_connections,
            keepalive_expiry=config.keepalive_expiry,
            ssl_context=config.upstream_ssl_context(),
        )

    def _open(self, allow_private: bool) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            # The pool limit is our semaphore: one limit, one place that waits.
            limit=0,
            keepalive_timeout=self._keepalive_expiry,
            ssl=self._ssl,
            resolver=None if allow_private else GuardedResolver(),
        )
        # aiohttp has no public hook for the protocol of its connections (aiohttp_compat).
        aiohttp_compat.set_protocol_factory(
            connector, functools.partial(_Handler, loop=asyncio.get_running_loop())
        )
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._max_connections)
        session = self._sessions[allow_private] = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            read_bufsize=self._read_bufsize,
            timeout=aiohttp.ClientTimeout(total=None),
            requote_redirect_url=False,
        )
        return session

    async def __aenter__(self) -> AiohttpTransport:
        if False not in self._sessions:
            self._open(allow_private=False)
        return self

    async def aclose(self) -> None:
        for session in self._sessions.values():
            await session.close()

    def _release_slot(self) -> None:
        self._in_use -= 1
        assert self._slots is not None
        self._slots.release()

    def pool_stats(self) -> PoolStats:
        idle = sum(
            aiohttp_compat.idle_connections(session.connector)
            for session in self._sessions.values()
            if session.connector is not None
        )
        return PoolStats(in_use=self._in_use, idle=idle)

    def requests_waiting(self) -> int:
        """Requests waiting for a connection to be checked in (the pool was full): what tests
        wait on to know a request is queued, not merely slow to start."""
        return self._waiting

    def connector_in_use(self) -> int:
        """Connections aiohttp itself counts as acquired: a cross-check of `pool_stats`."""
        return sum(
            aiohttp_compat.acquired_connections(session.connector)
            for session in self._sessions.values()
            if session.connector is not None
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        allow_private = bool(request.extensions.get(ALLOW_PRIVATE))
        if not allow_private:
            try:
                check_literal(request.url.host)
            except EgressRefused as exc:
                raise httpx.ConnectError(
                    f"refused by egress policy: {exc}", request=request
                ) from None
        session = self._sessions.get(allow_private) or self._open(allow_private)
        slots = self._slots
        assert slots is not None
        timeouts = request.extensions.get("timeout", {})
        if slots.locked():
            waited_from = time.monotonic()
            self._waiting += 1
            try:
                async with asyncio.timeout(timeouts.get("pool")):
                    await slots.acquire()
            except TimeoutError:
                raise httpx.PoolTimeout("no free upstream connection", request=request) from None
            finally:
                self._waiting -= 1
                request.extensions[POOL_WAIT] = time.monotonic() - waited_from
        else:
            await slots.acquire()
        self._in_use += 1
        release = _Release(self)
        response: aiohttp.ClientResponse | None = None
        try:
            with _map_aiohttp_errors(request):
                response = await session.request(
                    request.method,
                    URL(str(request.url), encoded=True),
                    headers=request.headers.multi_items(),
                    allow_redirects=False,
                    timeout=_client_timeout(timeouts.get("connect"), timeouts.get("read")),
                )
            check_head(request, response.status, response.raw_headers)
        except BaseException:
            if response is not None:
                response.close()
            release()
            raise
        extensions: dict[str, object] = {
            "http_version": b"HTTP/1.1",
            "reason_phrase": (response.reason or "").encode("latin-1", "replace"),
        }
        reads = _sized_reads(response)
        if reads is not None:
            reads.read_small(False)  # a kept-alive connection starts each response afresh
            extensions[READ_PACE] = reads.read_small
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_ResponseStream(response, request, release),
            request=request,
            extensions=extensions,
        )
