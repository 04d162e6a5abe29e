"""Stored versions and fills' files, on the cache's registry (`httpx.MockTransport`, the
injected clock): a version a reader holds keeps its bytes until the reader is done, a
replaced version nobody holds goes at once, every fill writes and removes only its own
partial file, and a fill is finished only once its files are released."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from relay import Config, Route, create_app
from relay.cache.cache import Cache, FillOrder
from relay.cache.clock import ManualClock
from relay.cache.key import base_key
from tests.asgi import Client, http_scope, lifespan_state

ROUTE = Route(prefix="/o/", upstream="http://upstream.test/")
BASE = base_key("/o/", b"/o/f", b"")
SWR = "max-age=1, stale-while-revalidate=60"


def _body(version: int) -> bytes:
    return f"version {version} ".encode() * 1000


class _Stream(httpx.AsyncByteStream):
    """A body in two chunks. `fail`: the upstream cuts it after the first. `held`: the second
    waits until it is set (`asking` tells the first was taken). `release`: closing the
    response waits until it is set (`closing` tells a close began)."""

    def __init__(
        self,
        body: bytes,
        *,
        fail: bool = False,
        held: asyncio.Event | None = None,
        release: asyncio.Event | None = None,
    ) -> None:
        self._body = body
        self._fail = fail
        self._held = held
        self._release = release
        self.asking = asyncio.Event()
        self.closing = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        half = len(self._body) // 2
        yield self._body[:half]
        self.asking.set()
        if self._fail:
            raise httpx.ReadError("cut by the upstream")
        if self._held is not None:
            await self._held.wait()
        yield self._body[half:]

    async def aclose(self) -> None:
        self.closing.set()
        if self._release is not None:
            await self._release.wait()


def _plain(version: int) -> tuple[int, _Stream]:
    return version, _Stream(_body(version))


def _origin(answers: list[Callable[[], tuple[int, _Stream]]]) -> httpx.MockTransport:
    """Answers requests in turn: (version, body stream) with the version's ETag."""

    async def handler(request: httpx.Request) -> httpx.Response:
        version, stream = answers.pop(0)()
        headers = {
            "etag": f'"v{version}"',
            "cache-control": SWR,
            "content-length": str(len(_body(version))),
        }
        return httpx.Response(200, headers=headers, stream=stream)

    return httpx.MockTransport(handler)


def _app(tmp_path: Path, transport: httpx.MockTransport, clock: ManualClock) -> Any:
    config = Config(
        routes=(ROUTE,), cache_dir=str(tmp_path), cache_max_bytes=1 << 24, resume_attempts=0
    )
    return create_app(config, transport=transport, clock=clock)


async def _get(app: Any, state: dict[str, Any]) -> Client:
    client = Client()
    await app(http_scope(state, "/o/f"), client.receive, client.send)
    return client


async def _settle(cache: Cache) -> None:
    """Every fill over and every disk job it asked for (removals run on the cache's threads)."""
    while cache.tasks:
        await asyncio.gather(*list(cache.tasks))
    await _disk_done(cache)


async def _disk_done(cache: Cache) -> None:
    await asyncio.sleep(0)  # a removal batch is closed at the next loop iteration
    await cache.disk.drain()


def _request() -> httpx.Request:
    return httpx.Request("GET", "http://upstream.test/f")


def _pairs(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "objects").rglob("*") if p.is_file())


async def test_a_pinned_version_keeps_its_bytes_until_its_reader_is_done(tmp_path: Path) -> None:
    """A revalidation publishes version 1 while a reader holds version 0: the index swaps to
    version 1, version 0's file keeps version 0's bytes until the reader unpins it, then it is
    removed. Version 1, replaced while no reader holds it, is removed at the swap."""
    clock = ManualClock()
    answers: list[Callable[[], tuple[int, _Stream]]] = [
        functools.partial(_plain, v) for v in range(3)
    ]
    app = _app(tmp_path, _origin(answers), clock)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        assert (await _get(app, state)).body == _body(0)
        (v0,) = cache.index.entries()
        with cache.pinned(v0):
            clock.advance(2)
            stale = await _get(app, state)
            assert (stale.headers[b"etag"], stale.body) == (b'"v0"', _body(0))
            await _settle(cache)
            (v1,) = cache.index.entries()
            assert v1.data != v0.data
            assert v1.meta.validator == '"v1"'
            assert v0.retired
            assert v0.data.read_bytes() == _body(0)
            assert cache.index.lingering == v0.cost
        await _disk_done(cache)
        assert not v0.data.exists()
        assert cache.index.lingering == 0
        clock.advance(2)
        assert (await _get(app, state)).headers[b"etag"] == b'"v1"'
        await _settle(cache)
        (v2,) = cache.index.entries()
        assert v2.meta.validator == '"v2"'
        assert not v1.data.exists()
        assert _pairs(tmp_path) == sorted([v2.data.name, v2.data.with_suffix(".meta").name])
        assert (await _get(app, state)).body == _body(2)


async def test_a_fill_is_finished_only_once_its_files_are_released(tmp_path: Path) -> None:
    """Issue 21 item 2's window: a failed fill closing its upstream response is still the
    key's fill (no successor starts before its partial file is removed); the next fill
    starts after it and is published."""
    clock = ManualClock()
    release = asyncio.Event()
    cut = _Stream(_body(0), fail=True, release=release)
    answers = [lambda: (0, cut), lambda: (1, _Stream(_body(1)))]
    app = _app(tmp_path, _origin(answers), clock)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        first = cache.fill(FillOrder(BASE, "identity", _request(), ROUTE))
        await cut.closing.wait()  # failed; closing its response
        assert first.failed is not None
        assert cache.fill_in_flight(BASE, "identity") is first
        assert cache.fill(FillOrder(BASE, "identity", _request(), ROUTE)) is first
        release.set()
        await _settle(cache)
        assert first.finished
        assert not first.partial.exists()
        second = cache.fill(FillOrder(BASE, "identity", _request(), ROUTE))
        assert second is not first
        await _settle(cache)
        assert second.published
        (entry,) = cache.index.entries()
        assert entry.data.read_bytes() == _body(1)


async def test_a_finished_fill_never_removes_another_fills_partial_file(tmp_path: Path) -> None:
    """Issue 21 item 2, forced: a second fill of one key runs while the first, failed, is
    cleaning up; the first removes only its own partial file, and the second is published
    whole."""
    clock = ManualClock()
    release, held = asyncio.Event(), asyncio.Event()
    cut = _Stream(_body(0), fail=True, release=release)
    slow = _Stream(_body(1), held=held)
    answers = [lambda: (0, cut), lambda: (1, slow)]
    app = _app(tmp_path, _origin(answers), clock)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        first = cache.fill(FillOrder(BASE, "identity", _request(), ROUTE))
        await cut.closing.wait()
        second = cache.new_fill(BASE, "identity", _request(), ROUTE, None)
        cache.start(second, BASE)
        await slow.asking.wait()  # the second fill wrote its first half
        release.set()
        await first.wait_finished()  # the first removed its partial file
        held.set()
        await _settle(cache)
        assert (second.published, second.failed) == (True, None)
        assert not first.partial.exists()
        assert second.partial != first.partial
        (entry,) = cache.index.entries()
        assert entry.data.read_bytes() == _body(1)
        hit = await _get(app, state)
        assert hit.headers[b"cache-status"].startswith(b"relay; hit")
        assert hit.body == _body(1)
