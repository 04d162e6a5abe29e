"""The cache's budget counts the disk (`httpx.MockTransport`, the injected clock): a fill
reserves its body block-rounded with room for its record, a published version counts its data
and its record block-rounded, the directories count at their size on disk; and an unsized body
that finds no room is told apart from one over the object limit by its bytes, not by the disk
it reserved."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from relay import Config, Route, create_app
from relay.cache.cache import Cache, FillOrder
from relay.cache.clock import ManualClock
from relay.cache.key import base_key
from relay.cache.storable import TOO_LARGE
from tests.asgi import lifespan_state

ROUTE = Route(prefix="/o/", upstream="http://upstream.test/")
KiB = 1024


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, count: int, size: int) -> None:
        self._count = count
        self._size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for _ in range(self._count):
            yield b"x" * self._size


def _origin(count: int, size: int, *, sized: bool) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"etag": '"e"', "cache-control": "max-age=60"}
        if sized:
            headers["content-length"] = str(count * size)
        else:
            headers["transfer-encoding"] = "chunked"
        return httpx.Response(200, headers=headers, stream=_Chunks(count, size))

    return httpx.MockTransport(handler)


async def _fill(cache: Cache, path: str) -> None:
    request = httpx.Request("GET", "http://upstream.test" + path)
    cache.fill(FillOrder(base_key("/o/", b"/o" + path.encode(), b""), "identity", request, ROUTE))
    while cache.tasks:
        for task in list(cache.tasks):
            await task


async def test_a_version_costs_its_blocks_and_the_directories_count(tmp_path: Path) -> None:
    """A 10,000-byte body reserves 3 blocks and a record allowance while filling; stored, it
    costs its 3 blocks and its record's block; the cache's disk use adds its directories."""
    config = Config(routes=(ROUTE,), cache_dir=str(tmp_path), cache_max_bytes=1 << 24)
    app = create_app(config, transport=_origin(10, 1000, sized=True), clock=ManualClock())
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        block = cache.store.block
        await _fill(cache, "/f")
        (entry,) = cache.index.entries()
        assert entry.cost == cache.store.blocks(10_000) + block
        assert cache.index.reserved == 0
        directories = sum(
            p.stat().st_blocks * 512 for p in (tmp_path, tmp_path / "objects", entry.data.parent)
        )
        assert cache.index.on_disk == entry.cost + directories
        assert cache.store.reservation(10_000) == cache.store.blocks(10_000) + 4096


async def test_an_unsized_body_without_room_is_not_called_too_large(tmp_path: Path) -> None:
    """A chunked body of exactly cache_max_object_bytes, in a budget that runs out first:
    the fill passes it on as `no room` (a short pass), not `too large` (the disk it reserved,
    block-rounded with its record allowance, is more than its bytes)."""
    config = Config(
        routes=(ROUTE,),
        cache_dir=str(tmp_path),
        cache_max_bytes=(12 + 60 + 4) * KiB,  # directories, 60 KiB of body, a record
        cache_max_object_bytes=64 * KiB,
    )
    app = create_app(config, transport=_origin(16, 4 * KiB, sized=False), clock=ManualClock())
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        request = httpx.Request("GET", "http://upstream.test/f")
        fill = cache.fill(FillOrder(base_key("/o/", b"/o/f", b""), "identity", request, ROUTE))
        fill.prefetch = True  # no client: runs to its end
        while cache.tasks:
            for task in list(cache.tasks):
                await task
        assert fill.passthrough == "no room"
        assert fill.passthrough != TOO_LARGE
