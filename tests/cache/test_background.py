"""Fills no client waits for (relay/cache/cache.py): bounded in number, stopped to make room for
clients, and never joined by a client once stopped. Driven through the app with hand-written
receive/send, the upstream on `httpx.MockTransport` with bodies that wait on a gate the test
opens: every step waits on state, never on time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.cache.cache import Cache
from relay.cache.fill import Fill
from relay.config import Config, Route
from relay.server.app import create_app
from tests.asgi import Client, http_scope, lifespan_state


class _Gated(httpx.AsyncByteStream):
    """`first`, then (once `gate` is set) `rest`."""

    def __init__(self, first: bytes, rest: bytes, gate: asyncio.Event) -> None:
        self._first, self._rest, self._gate = first, rest, gate
        self.closed = False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._first
        await self._gate.wait()
        yield self._rest

    async def aclose(self) -> None:
        self.closed = True


class _Upstream:
    """Answers every GET with a storable 6-byte body; the first answer of each path waits
    after 3 bytes until `gate` is set (later ones do not wait)."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.requests: list[str] = []
        self.bodies: list[_Gated] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        opened = asyncio.Event()
        if path in self.requests:
            opened.set()
        self.requests.append(path)
        body = _Gated(b"abc", b"def", self.gate if not opened.is_set() else opened)
        self.bodies.append(body)
        headers = {"Content-Length": "6", "ETag": f'"{path}"', "Cache-Control": "max-age=600"}
        return httpx.Response(200, headers=headers, stream=body)


def _app(tmp_path: Path, upstream: _Upstream, **settings: Any) -> Any:
    config = Config(
        routes=(Route(prefix="/o/", upstream="http://up.test/"),),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 20,
        **settings,
    )
    return create_app(config, transport=httpx.MockTransport(upstream.handler))


async def _leave_after_first_chunk(app: Any, state: dict[str, Any], path: str) -> None:
    """A client that reads the first body chunk of `path` and disconnects."""
    client = Client(disconnect_after=1)
    await app(http_scope(state, path), client.receive, client.send)
    assert client.status == 200
    assert not client.completed


def _fill(cache: Cache, path: str) -> Fill:
    (fill,) = [f for f in cache.fills.values() if f.key.endswith(path)]
    return fill


async def _over(fill: Fill) -> None:
    assert fill.task is not None
    await asyncio.wait({fill.task})


@pytest.mark.parametrize(
    ("count", "share", "pool", "limit"),
    [(8, 0.25, 100, 8), (8, 0.25, 3, 1), (8, 0.5, 10, 5), (2, 1.0, 100, 2), (0, 0.25, 100, 0)],
)
def test_the_background_limit_is_a_count_and_a_share_of_the_pool(
    tmp_path: Path, count: int, share: float, pool: int, limit: int
) -> None:
    """At most `cache_background_fills`, and `cache_background_share` of `max_connections`
    (at least one)."""
    config = Config(
        cache_dir=str(tmp_path),
        cache_max_bytes=1,
        cache_background_fills=count,
        cache_background_share=share,
        max_connections=pool,
    )
    assert Cache(config, None, None, None).background_limit == limit  # type: ignore[arg-type]


async def test_a_fill_whose_last_client_leaves_runs_on_within_the_limit(tmp_path: Path) -> None:
    """cache_background_fills = 1: the first fill left without a client runs on; the second
    one stops when its client leaves (its upstream body closed, nothing stored), and the
    first, once its upstream goes on, is stored."""
    upstream = _Upstream()
    app = _app(tmp_path, upstream, cache_background_fills=1)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        await _leave_after_first_chunk(app, state, "/o/a")
        await _leave_after_first_chunk(app, state, "/o/b")
        stopped = _fill(cache, "/o/b")
        assert stopped.stopping is not None
        await _over(stopped)
        assert upstream.bodies[1].closed
        assert cache.background_fills() == 1
        assert cache.stats.background_stopped == 1
        kept = _fill(cache, "/o/a")
        upstream.gate.set()
        await _over(kept)
        assert kept.published
        assert len(cache.index) == 1


async def test_make_room_stops_the_fill_without_a_client_for_longest(tmp_path: Path) -> None:
    upstream = _Upstream()
    app = _app(tmp_path, upstream)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        await _leave_after_first_chunk(app, state, "/o/a")
        await _leave_after_first_chunk(app, state, "/o/b")
        older, newer = _fill(cache, "/o/a"), _fill(cache, "/o/b")
        assert cache.make_room()
        assert older.stopping is not None
        assert newer.stopping is None
        await _over(older)
        assert upstream.bodies[0].closed
        assert not older.published
        assert cache.background_fills() == 1
        assert cache.make_room()
        await _over(newer)
        assert not cache.make_room()  # nothing left to stop
        assert len(cache.index) == 0


async def test_a_client_coming_as_its_fill_is_stopped_gets_the_next_fill(
    tmp_path: Path,
) -> None:
    """A fill is stopped (make_room) and, before it is over, a client asks for its object: the
    client does not join the fill being stopped (it would be cut after the bytes already
    written); it waits it out and is answered in full by the next fill, which is stored."""
    upstream = _Upstream()
    app = _app(tmp_path, upstream)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        await _leave_after_first_chunk(app, state, "/o/a")
        assert cache.make_room()
        client = Client()
        await app(http_scope(state, "/o/a"), client.receive, client.send)
        assert client.status == 200
        assert client.body == b"abcdef"
        assert client.completed
        assert upstream.requests == ["/a", "/a"]
        assert len(cache.index) == 1


class _Chunked(httpx.AsyncByteStream):
    """An unsized body: `abc`, then (once `gates[0]` is set) `def`, then (`gates[1]`) `ghi`."""

    def __init__(self) -> None:
        self.gates = (asyncio.Event(), asyncio.Event())
        self.closes = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"abc"
        await self.gates[0].wait()
        yield b"def"
        await self.gates[1].wait()
        yield b"ghi"

    async def aclose(self) -> None:
        self.closes += 1


def _overflowing(tmp_path: Path, body: _Chunked) -> Any:
    """Every GET answers `body`, chunked: it outgrows cache_max_object_bytes = 4 at `def`."""

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Transfer-Encoding": "chunked", "ETag": '"v1"', "Cache-Control": "max-age=60"}
        return httpx.Response(200, headers=headers, stream=body)

    config = Config(
        routes=(Route(prefix="/o/", upstream="http://up.test/"),),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 20,
        cache_max_object_bytes=4,
    )
    return create_app(config, transport=httpx.MockTransport(handler))


async def _written(fill: Fill, size: int) -> None:
    while fill.written < size:
        await fill.wait_beyond(fill.written)


async def test_an_overflowed_fill_hands_its_response_to_its_reader(tmp_path: Path) -> None:
    """The reader that takes the rest owns it: the fill ends without closing it (it is no
    longer the fill's response), and the reader relays it to the end and closes it."""
    body = _Chunked()
    app = _overflowing(tmp_path, body)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        client = Client()
        reading = asyncio.create_task(app(http_scope(state, "/o/big"), client.receive, client.send))
        while not cache.fills:
            await asyncio.sleep(0)
        fill = _fill(cache, "/o/big")
        await _written(fill, 3)
        body.gates[0].set()
        await _over(fill)
        assert fill.overflow is not None
        assert not fill.published
        assert not fill.using_upstream
        assert body.closes == 0  # the reader's now, still being read
        body.gates[1].set()
        await reading
        assert client.status == 200
        assert client.body == b"abcdefghi"
        assert body.closes == 1
        assert not cache.index.get(fill.key)


async def test_an_overflowed_fill_closes_the_rest_nobody_takes(tmp_path: Path) -> None:
    """Its client gone before the overflow: the fill (background work within the limit)
    closes the rest it offered, once, stores nothing and is not counted as stopped."""
    body = _Chunked()
    app = _overflowing(tmp_path, body)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        await _leave_after_first_chunk(app, state, "/o/big")
        fill = _fill(cache, "/o/big")
        assert fill.stopping is None
        body.gates[0].set()
        body.gates[1].set()
        await _over(fill)
        assert fill.overflow is not None
        assert not fill.published
        assert not fill.using_upstream
        assert body.closes == 1
        assert cache.stats.background_stopped == 0
