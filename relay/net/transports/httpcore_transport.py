"""httpx's own transport (httpcore), kept selectable for comparison and as a fallback.

Two pools, like the aiohttp transport: one whose network backend enforces the egress policy
(resolve once, check every address, connect to the checked address), one for routes that
opted in to private addresses.

httpcore's read timeout restarts with every read, so a head trickled a line a second never
timed out: relay gives the whole response head the read timeout, measured from when httpcore
starts waiting for it (its `trace` extension) to when it is complete. The same trace tells
when a request that found the pool full got a connection (the POOL_WAIT extension). Heads
relay cannot relay are refused (relay/transports/heads.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from types import TracebackType
from typing import Any

import httpcore
import httpx

from relay.config import Config
from relay.net.egress import GuardedNetworkBackend
from relay.net.transports import ALLOW_PRIVATE, POOL_WAIT, PoolStats
from relay.net.transports.heads import check_head
from relay.net.transports.httpcore_compat import has_unread_bytes, pool_of, set_network_backend

logger = logging.getLogger(__name__)

_HEAD_STARTED = "http11.receive_response_headers.started"
_HEAD_COMPLETE = "http11.receive_response_headers.complete"
# The first event of a request once the pool gave it a connection: a new one starts
# connecting, a kept-alive one starts sending.
_CONNECTION_ASSIGNED = frozenset(
    {
        "connection.connect_tcp.started",
        "connection.connect_unix_socket.started",
        "http11.send_request_headers.started",
        "http2.send_request_headers.started",
    }
)


# Requests that may be sent again when a kept-alive connection closed under them before any
# byte of the response arrived (RFC 9112 9.3.1; aiohttp does the same for idempotent ones).
_RESENDABLE = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclasses.dataclass
class _Attempt:
    """What one attempt at a request did on the wire, seen by the network backend."""

    connected: bool = False  # opened a new connection (it did not reuse a pooled one)
    received: int = 0  # bytes read before the response head was handed over


_ATTEMPT: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "relay_httpcore_attempt", default=None
)


class _WatchedStream(httpcore.AsyncNetworkStream):
    """A network stream that counts what it reads for the attempt in progress (httpcore
    reads in the requesting task, so the context variable is that request's)."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await self._inner.read(max_bytes, timeout)
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.received += len(data)
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        return _WatchedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _WatchedBackend(httpcore.AsyncNetworkBackend):
    def __init__(self, inner: httpcore.AsyncNetworkBackend) -> None:
        self._inner = inner

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        attempt = _ATTEMPT.get()
        if attempt is not None:
            attempt.connected = True
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _WatchedStream(stream)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _ResponseStream(httpx.AsyncByteStream):
    """httpx's response stream; closing it also closes idle connections holding unread bytes.

    A second, unrequested response sent right behind a complete one is read by h11 with the end
    of the first; httpcore would pool the connection and hand those bytes to the next request
    as its response. Bytes arriving later make the socket readable, which httpcore checks.
    """

    __slots__ = ("_pool", "_stream")

    def __init__(self, stream: httpx.AsyncByteStream, pool: httpcore.AsyncConnectionPool) -> None:
        self._stream = stream
        self._pool = pool

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()
        for connection in self._pool.connections:
            if connection.is_idle() and has_unread_bytes(connection):
                logger.warning("an upstream sent bytes after a complete response; closing it")
                await connection.aclose()


class HttpcoreTransport(httpx.AsyncBaseTransport):
    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._max_connections = limits.max_connections
        verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self._guarded = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify)
        # httpx does not take a network backend; the pool it builds does.
        set_network_backend(self._guarded, _WatchedBackend(GuardedNetworkBackend()))
        self._open = httpx.AsyncHTTPTransport(limits=limits, trust_env=False, verify=verify)
        set_network_backend(self._open, _WatchedBackend(httpcore.AnyIOBackend()))

    @classmethod
    def from_config(cls, config: Config) -> HttpcoreTransport:
        return cls(
            httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_keepalive,
                keepalive_expiry=config.keepalive_expiry,
            ),
            ssl_context=config.upstream_ssl_context(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        transport = self._open if request.extensions.get(ALLOW_PRIVATE) else self._guarded
        attempt = _Attempt()
        token = _ATTEMPT.set(attempt)
        try:
            try:
                response = await self._send(transport, request)
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
                # A pooled connection the upstream closed (or reset) just as this request
                # went out on it: nothing of a response arrived, so the upstream did not act
                # on it. Sent again once, on a new connection.
                if request.method not in _RESENDABLE or attempt.connected or attempt.received:
                    raise
                logger.info(
                    "a kept-alive upstream connection closed before any byte of the response"
                    " (%s); sending the request again on a new connection",
                    exc,
                )
                attempt = _Attempt()
                _ATTEMPT.set(attempt)
                response = await self._send(transport, request)
        finally:
            _ATTEMPT.reset(token)
        try:
            check_head(request, response.status_code, response.headers.raw)
        except httpx.HTTPError:
            await response.aclose()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _ResponseStream(response.stream, pool_of(transport))
        return response

    async def _send(
        self, transport: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        read_timeout = request.extensions.get("timeout", {}).get("read")
        waited_from = time.monotonic() if self._pool_full(transport) else None
        if read_timeout is None and waited_from is None:
            return await transport.handle_async_request(request)
        return await self._traced(transport, request, read_timeout, waited_from)

    def _pool_full(self, transport: httpx.AsyncHTTPTransport) -> bool:
        """Whether a request now has to wait for a connection: every one allowed is open and
        busy (httpcore would otherwise reuse an idle one, or close it to open one)."""
        if self._max_connections is None:
            return False
        connections = pool_of(transport).connections
        return len(connections) >= self._max_connections and not any(
            c.is_idle() for c in connections
        )

    async def _traced(
        self,
        transport: httpx.AsyncHTTPTransport,
        request: httpx.Request,
        timeout: float | None,
        waited_from: float | None,
    ) -> httpx.Response:
        """Send through httpcore's `trace` extension: to give the whole response head the
        read timeout, and to record how long a request waited for a connection (POOL_WAIT,
        as the aiohttp transport records it)."""
        loop = asyncio.get_running_loop()
        outer = request.extensions.get("trace")
        deadline = asyncio.timeout(None)

        def waited() -> None:
            nonlocal waited_from
            if waited_from is not None:
                request.extensions[POOL_WAIT] = time.monotonic() - waited_from
                waited_from = None

        async def trace(event: str, info: dict[str, Any]) -> None:
            if event in _CONNECTION_ASSIGNED:
                waited()
            elif event == _HEAD_STARTED and timeout is not None:
                deadline.reschedule(loop.time() + timeout)
            elif event == _HEAD_COMPLETE:
                deadline.reschedule(None)
            if outer is not None:
                await outer(event, info)

        request.extensions["trace"] = trace
        try:
            async with deadline:
                return await transport.handle_async_request(request)
        except TimeoutError:
            if not deadline.expired():
                raise
            raise httpx.ReadTimeout(
                f"no complete response head within {timeout:g}s", request=request
            ) from None
        finally:
            waited()  # a wait that ended without a connection (pool timeout, cancellation)
            if outer is not None:
                request.extensions["trace"] = outer
            else:
                request.extensions.pop("trace", None)

    async def __aenter__(self) -> HttpcoreTransport:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._guarded.aclose()
        await self._open.aclose()

    def pool_stats(self) -> PoolStats:
        connections = pool_of(self._guarded).connections + pool_of(self._open).connections
        idle = sum(1 for c in connections if c.is_idle())
        return PoolStats(in_use=len(connections) - idle, idle=idle)
