"""The cache's bounds, on `httpx.MockTransport` with the injected clock: pass markers cover
ranges and expire; an object over the object limit is passed longer; every in-memory structure
keyed by client input stays within its bound however many unique URLs clients choose."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import Config, Route, create_app
from relay.cache import bounded
from relay.cache.bounded import MAX_PASSES, MIN_HINTS, Lru, LruSet, Passes, hints_bound
from relay.cache.cache import PASS_SECONDS, TOO_LARGE_PASS_SECONDS, Cache
from relay.cache.clock import ManualClock
from relay.cache.index import Index
from relay.cache.store import Store
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)
MiB = 1024 * 1024
SLICE = 65536
SIZE = 4 * SLICE


class _Body(httpx.AsyncByteStream):
    def __init__(self, size: int) -> None:
        self._size = size

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"x" * self._size


def _upstream(seen: list[httpx.Request], **extra: str) -> httpx.MockTransport:
    """An object of SIZE bytes at every path, answering byte ranges; `extra` headers on every
    answer; `/down/...` cannot be reached."""

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path.startswith("/down/"):
            raise httpx.ConnectError("refused", request=request)
        headers = {"etag": '"v1"', "cache-control": "max-age=60", "accept-ranges": "bytes"}
        headers.update(extra)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
        if match is None:
            headers["content-length"] = str(SIZE)
            return httpx.Response(200, headers=headers, stream=_Body(SIZE))
        first = int(match.group(1))
        last = min(int(match.group(2) or SIZE - 1), SIZE - 1)
        headers["content-range"] = f"bytes {first}-{last}/{SIZE}"
        headers["content-length"] = str(last - first + 1)
        return httpx.Response(206, headers=headers, stream=_Body(last - first + 1))

    return httpx.MockTransport(handler)


def _config(tmp_path: Path, **settings: Any) -> Config:
    values: dict[str, Any] = {"cache_max_bytes": 64 * MiB, "cache_slice_bytes": SLICE}
    values.update(settings)
    return Config(routes=ROUTES, cache_dir=str(tmp_path), **values)


async def _get(app: Any, state: dict[str, Any], path: str, **headers: str) -> Client:
    client = Client()
    raw = [(b"host", b"relay.test")] + [(n.encode(), v.encode()) for n, v in headers.items()]
    await app(http_scope(state, path, headers=raw), client.receive, client.send)
    return client


def _slice_requests(seen: list[httpx.Request]) -> int:
    """Upstream requests for a whole aligned slice (the slice fills)."""
    return sum(1 for r in seen if r.headers.get("range", "").endswith(f"-{SLICE - 1}"))


# ---- the structures -------------------------------------------------------------------------


def test_lru_keeps_the_most_recently_set() -> None:
    lru: Lru[str, int] = Lru(3)
    for i in range(5):
        lru[f"k{i}"] = i
    assert list(lru) == ["k2", "k3", "k4"]
    lru["k2"] = 22
    lru["k5"] = 5
    assert list(lru) == ["k4", "k2", "k5"]
    members = LruSet(2)
    members.update(["a", "b", "c"])
    assert len(members) == 2
    assert "a" not in members
    assert list(members) == ["b", "c"]


def test_pass_markers_expire_and_are_pruned() -> None:
    """A marker is active until its time; expired markers go as new ones are set, and there
    are never more than the bound."""
    clock = ManualClock()
    passes = Passes(clock, max_entries=100)
    passes.set("a", 30)
    passes.set("big", 600)
    clock.advance(31)
    assert not passes.active("a")
    assert passes.active("big")
    for i in range(5):
        passes.set(f"old{i}", 1)
    clock.advance(2)
    passes.set("new", 30)
    assert len(passes) == 2  # "big" and "new": the expired ones were pruned
    for i in range(1000):
        passes.set(f"k{i}", 30)
    assert len(passes) == 100
    assert passes.active("k999")
    assert not passes.active("k0")


def test_hint_bound_follows_the_budget() -> None:
    assert hints_bound(1 * MiB) == MIN_HINTS
    assert hints_bound(10 * 1024 * MiB) == 4 * 10 * 1024


# ---- pass markers and slices ----------------------------------------------------------------


async def test_a_private_object_passes_its_ranges_until_the_marker_expires(
    tmp_path: Path,
) -> None:
    """Item 9: one slice fill learns the object is private; its other ranges are relayed with
    the client's own Range (no slice) for PASS_SECONDS, then a slice is tried again."""
    seen: list[httpx.Request] = []
    clock = ManualClock()
    app = create_app(
        _config(tmp_path), transport=_upstream(seen, **{"cache-control": "private"}), clock=clock
    )
    async with lifespan_state(app) as state:
        for i in range(6):
            got = await _get(app, state, "/o/p", range=f"bytes={i * 1000}-{i * 1000 + 94}")
            assert got.status == 206
            assert got.body == b"x" * 95
        assert _slice_requests(seen) == 1
        assert [r.headers["range"] for r in seen[1:]] == [
            f"bytes={i * 1000}-{i * 1000 + 94}" for i in range(6)
        ]
        clock.advance(PASS_SECONDS + 1)
        assert (await _get(app, state, "/o/p", range="bytes=0-9")).status == 206
        assert _slice_requests(seen) == 2


async def test_an_object_over_the_limit_is_passed_for_longer(tmp_path: Path) -> None:
    """Item 13: a slice fill learns the object's total is over cache_max_object_bytes: no
    slice is stored, ranges and whole GETs are relayed for TOO_LARGE_PASS_SECONDS."""
    seen: list[httpx.Request] = []
    clock = ManualClock()
    config = _config(tmp_path, cache_max_object_bytes=2 * SLICE)
    app = create_app(config, transport=_upstream(seen), clock=clock)
    async with lifespan_state(app) as state:
        cache: Cache = state["cache"]
        for i in range(4):
            got = await _get(app, state, "/o/big", range=f"bytes={i * SLICE}-{i * SLICE}")
            assert got.status == 206
            assert got.body == b"x"
        assert _slice_requests(seen) == 1
        assert cache.index.stored == 0
        assert len(cache.index) == 0
        clock.advance(PASS_SECONDS + 1)
        whole = await _get(app, state, "/o/big")
        assert whole.body == b"x" * SIZE
        assert b"cache-status" not in whole.headers
        assert "range" not in seen[-1].headers  # relayed at once: no fill tried first
        assert _slice_requests(seen) == 1
        clock.advance(TOO_LARGE_PASS_SECONDS)
        assert (await _get(app, state, "/o/big", range="bytes=0-0")).status == 206
        assert _slice_requests(seen) == 2
        assert cache.index.stored == 0


# ---- unique URLs ----------------------------------------------------------------------------


async def test_unique_urls_leave_every_structure_within_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 14 (memory): unique URLs each of a private object (pass markers), of an object
    varying on Accept-Encoding (the Vary index) and of a range of an unreachable object (slice
    hints), through the request path: each structure stays within its bound (lowered here to
    300 so that 1,200 URLs of each kind pass it four times over; the defaults over 10,000
    keys are the next test's)."""
    monkeypatch.setattr(bounded, "MAX_PASSES", 300)
    monkeypatch.setattr(bounded, "MIN_HINTS", 300)
    per_kind = 1_200
    for kind, extra in (
        ("passes", {"cache-control": "private"}),
        ("vary", {"vary": "Accept-Encoding"}),
        ("sliced", {}),
    ):
        seen: list[httpx.Request] = []
        config = _config(tmp_path / kind, cache_max_bytes=1 * MiB)
        app = create_app(config, transport=_upstream(seen, **extra), clock=ManualClock())
        async with lifespan_state(app) as state:
            cache: Cache = state["cache"]
            for i in range(per_kind):
                if kind == "sliced":
                    await _get(app, state, f"/o/down/{i}", range="bytes=0-9")
                else:
                    await _get(app, state, f"/o/{kind}/{i}")
            sizes = {
                "passes": len(cache.passes),
                "vary": len(cache.index.vary),
                "sliced": len(cache.slices.sliced),
            }
            assert sizes.pop(kind) == 300
            assert set(sizes.values()) == {0}, (kind, sizes)


def test_default_bounds_hold_over_10000_keys(tmp_path: Path) -> None:
    """The structures at their default bounds, 10,000 unique keys each (the cache's own
    entry points, no request): MAX_PASSES markers, hints_bound(budget) Vary and slice
    hints."""
    config = _config(tmp_path, cache_max_bytes=512 * MiB)
    cache = Cache(config, upstream=None, store=Store(tmp_path), index=Index(512 * MiB))  # type: ignore[arg-type]
    for i in range(10_000):
        cache.passes.set(f"/o/{i}", PASS_SECONDS)
        cache.index.vary[f"/o/{i}"] = "accept-encoding"
        cache.slices.sliced.add(f"/o/{i}")
    assert len(cache.passes) == MAX_PASSES == 4096
    assert len(cache.index.vary) == len(cache.slices.sliced) == hints_bound(512 * MiB) == 4096
