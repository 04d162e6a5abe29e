"""RelayResponse owns the upstream stream: closed on every path, both ASGI disconnect styles."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from relay import Config, Route, create_app
from relay.errors import TransferAborted
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)


class EndlessBody(httpx.AsyncByteStream):
    """An upstream body that never ends unless it fails; records whether it was closed."""

    def __init__(self, *, fail_after: int | None = None, stall_after: int | None = None):
        self.chunks_sent = 0
        self.closed = False
        self._fail_after = fail_after
        self._stall_after = stall_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            if self._fail_after is not None and self.chunks_sent >= self._fail_after:
                raise httpx.ReadError("connection reset by peer")
            if self._stall_after is not None and self.chunks_sent >= self._stall_after:
                await asyncio.Event().wait()
            self.chunks_sent += 1
            yield b"x" * 1024
            await asyncio.sleep(0)

    async def aclose(self) -> None:
        self.closed = True


def app_with_body(body: EndlessBody) -> Starlette:
    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=body)

    return create_app(Config(routes=ROUTES), transport=httpx.MockTransport(handler))


async def test_asgi_23_disconnect_mid_body_closes_upstream() -> None:
    """ASGI 2.3: the server only reports the disconnect on receive; relay stops and closes."""
    body = EndlessBody()
    app = app_with_body(body)
    client = Client(disconnect_after=5)
    async with lifespan_state(app) as state:
        # Bounded: without disconnect handling this would read the endless body forever.
        await asyncio.wait_for(app(http_scope(state, "/o/f"), client.receive, client.send), 10)
    assert body.closed
    assert not client.completed
    assert body.chunks_sent < 50


async def test_asgi_24_send_raising_oserror_closes_upstream() -> None:
    """ASGI 2.4: send raises OSError once the client is gone; relay closes the upstream."""
    body = EndlessBody()
    app = app_with_body(body)
    client = Client(raise_after=5)
    async with lifespan_state(app) as state:
        scope = http_scope(state, "/o/f", spec_version="2.4")
        await asyncio.wait_for(app(scope, client.receive, client.send), 10)
    assert body.closed
    assert not client.completed


async def test_upstream_error_mid_body_aborts_and_closes() -> None:
    body = EndlessBody(fail_after=3)
    app = app_with_body(body)
    client = Client()
    async with lifespan_state(app) as state:
        with pytest.raises(TransferAborted):
            await app(http_scope(state, "/o/f"), client.receive, client.send)
    assert body.closed
    assert client.status == 200
    assert not client.completed


async def test_cancellation_mid_body_closes_upstream_and_propagates() -> None:
    """Server shutdown cancels the request task: the upstream is closed, the cancel is not eaten."""
    body = EndlessBody(stall_after=2)
    app = app_with_body(body)
    client = Client()
    async with lifespan_state(app) as state:
        task = asyncio.ensure_future(app(http_scope(state, "/o/f"), client.receive, client.send))
        while body.chunks_sent < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert body.closed


async def test_disconnect_while_waiting_for_upstream_headers_cancels_the_attempt() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        raise AssertionError("unreachable")

    app = create_app(Config(routes=ROUTES), transport=httpx.MockTransport(handler))
    client = Client()
    async with lifespan_state(app) as state:
        task = asyncio.ensure_future(app(http_scope(state, "/o/f"), client.receive, client.send))
        await started.wait()
        client.disconnect()
        await asyncio.wait_for(task, 5)
    assert cancelled.is_set()
    assert not client.messages  # nothing was sent to a client that is gone


async def test_normal_end_closes_upstream_and_completes() -> None:
    closed = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"hello "
            yield b"world"

        async def aclose(self) -> None:
            closed.append(True)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "11"}, stream=Body())

    app = create_app(Config(routes=ROUTES), transport=httpx.MockTransport(handler))
    client = Client()
    async with lifespan_state(app) as state:
        await app(http_scope(state, "/o/f"), client.receive, client.send)
    assert client.body == b"hello world"
    assert client.completed
    assert closed == [True]


async def test_short_body_against_content_length_is_aborted() -> None:
    """Defence in depth: a transport that ends a body early still makes relay abort."""

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"Content-Length": "100"}, stream=Body())

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield b"only forty bytes" * 2 + b"01234567"

    app = create_app(Config(routes=ROUTES), transport=httpx.MockTransport(handler))
    client = Client()
    async with lifespan_state(app) as state:
        with pytest.raises(TransferAborted):
            await app(http_scope(state, "/o/f"), client.receive, client.send)
    assert not client.completed


async def test_a_body_done_in_one_chunk_needs_no_disconnect_watcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watcher task starts only for a body longer than one chunk (or a slow upstream)."""
    from relay.proxy.streaming import RelayResponse

    started: list[bool] = []
    original = RelayResponse._start_watcher

    def counting(self: RelayResponse) -> None:
        started.append(self._active)
        original(self)

    monkeypatch.setattr(RelayResponse, "_start_watcher", counting)

    async def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"content-length": "1024"}, stream=httpx.ByteStream(b"x" * 1024)
        )

    app = create_app(Config(routes=ROUTES), transport=httpx.MockTransport(handler))
    async with lifespan_state(app) as state:
        small = Client()
        await app(http_scope(state, "/o/small"), small.receive, small.send)
        assert small.completed
        assert started == []

        class Chunked(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                for _ in range(4):
                    yield b"y" * 1024

        async def chunked(request: httpx.Request) -> httpx.Response:
            return httpx.Response(200, headers={"content-length": "4096"}, stream=Chunked())

    app = create_app(Config(routes=ROUTES), transport=httpx.MockTransport(chunked))
    async with lifespan_state(app) as state:
        big = Client()
        await app(http_scope(state, "/o/big"), big.receive, big.send)
        assert big.completed
        assert started == [True]


async def test_a_handed_over_response_is_closed_when_its_slot_is_refused() -> None:
    """A RelayResponse given an open upstream response owns it from construction: refused a
    stream slot, it still closes it."""
    from relay.net.routing import RouteTable
    from relay.net.upstream import Upstream
    from relay.proxy.admission import StreamLimiter
    from relay.proxy.streaming import RelayResponse

    body = EndlessBody()
    config = Config(routes=ROUTES)
    async with httpx.AsyncClient(
        transport=httpx.MockTransport(lambda request: httpx.Response(200, stream=body))
    ) as http:
        opened = await http.send(httpx.Request("GET", "http://upstream.test/f"), stream=True)
        routes = RouteTable(config.routes)
        full = StreamLimiter(1)
        assert full.acquire() is None
        response = RelayResponse(
            Upstream(http, config),
            "GET",
            routes.resolve(b"/o/f", b""),
            [],
            routes=routes,
            limiter=full,
            client=None,
            config=config,
            opened=opened,
        )
        client = Client()
        await response(http_scope({}, "/o/f"), client.receive, client.send)
    assert client.status == 503
    assert body.closed
    assert full.active == 1
