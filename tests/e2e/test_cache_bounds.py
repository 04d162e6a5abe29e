"""The cache stays bounded whatever clients ask, end to end: ranges of objects it will not store
are relayed with the client's own range (not a slice each), an object over the object limit is
never stored as slices, and a body that turns out too large to store still reaches every
client whole. A real relay under uvicorn in front of the test origin, counting the origin's
body bytes; every body is checked by sha256."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.caching import (
    MakeRelay,
    caching_relay,
    data_files,
    disk_use,
    origin_gets,
    settled,
)
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.harness import RelayThread
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


def _range(relay: RelayThread, path: str, first: int, last: int) -> httpx.Response:
    response = httpx.get(relay.url + path, headers={"range": f"bytes={first}-{last}"}, timeout=30)
    assert response.status_code == 206, response.text
    return response


@pytest.mark.parametrize("refusal", ["cc=private,max-age=60", "vary=*"])
def test_cache_ranges_of_an_unstorable_object_are_relayed_not_sliced(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path, refusal: str
) -> None:
    """Item 9: once a slice fill learns the object may not be stored (private, Vary: *), its
    other ranges are relayed with the client's own range: 12 ranges of 95 bytes cost the
    origin at most one slice, not a slice each."""
    relay = cached()
    origin.reset_stats()
    size = 8 * MiB
    path = f"/o/gen/8m?{refusal}"
    for i in range(12):
        first = i * 600_000 + 17
        response = _range(relay, path, first, first + 94)
        assert response.headers["content-range"] == f"bytes {first}-{first + 94}/{size}"
        assert hashlib.sha256(response.content).hexdigest() == expected_sha256(
            size, first, first + 95
        )
        assert "cache-status" not in response.headers  # relayed, not from the cache
    settled(relay)
    # One slice fill learnt the verdict (at most its slice's bytes, cut when it closed),
    # then twelve 95-byte ranges: far less than the twelve slices it used to cost.
    seen = [(r.header("range"), r.header("if-range")) for r in origin.requests]
    assert origin.body_bytes <= 1 * MiB + 12 * 95, seen
    assert len(origin_gets(origin, "/gen/8m")) == 13
    assert data_files(tmp_path / "cache") == []


def test_cache_ranges_of_an_object_over_the_object_limit_are_relayed(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Item 13: one-byte ranges over a 12 MiB object with a 4 MiB object limit are relayed
    with the client's own range: no slice is stored, the origin sends at most one slice
    beyond the bytes asked for, and a whole GET is relayed with one upstream request."""
    relay = cached(cache_max_object_bytes=4 * MiB)
    origin.reset_stats()
    size = 12 * MiB
    path = "/o/gen/12m?v=13"
    for i in range(20):
        first = i * 600_001
        response = _range(relay, path, first, first)
        assert len(response.content) == 1
        assert hashlib.sha256(response.content).hexdigest() == expected_sha256(
            size, first, first + 1
        )
    settled(relay)
    assert origin.body_bytes <= 1 * MiB + 20
    _nothing_stored(relay, tmp_path)
    assert data_files(tmp_path / "cache") == []
    origin.reset_stats()
    whole = httpx.get(relay.url + path, timeout=60)
    assert hashlib.sha256(whole.content).hexdigest() == expected_sha256(size)
    assert "cache-status" not in whole.headers
    assert len(origin_gets(origin, "/gen/12m")) == 1
    settled(relay)
    assert data_files(tmp_path / "cache") == []


def _fetch(relay: RelayThread, path: str) -> str:
    """The sha256 of a whole GET's body (raises if the transfer is cut)."""
    digest = hashlib.sha256()
    with httpx.stream("GET", relay.url + path, timeout=60) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            digest.update(chunk)
    return digest.hexdigest()


def test_cache_chunked_body_over_the_object_limit_reaches_its_client_whole(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Item 12, one client: a 12 MiB chunked body with a 4 MiB object limit is not stored,
    and its client gets all of it (the fill hands it the live upstream response): one
    upstream request, the body sent by the origin once."""
    relay = cached(cache_max_object_bytes=4 * MiB)
    origin.reset_stats()
    path = "/o/gen/12m?v=121&cl=0"
    assert _fetch(relay, path) == expected_sha256(12 * MiB)
    settled(relay)
    assert len(origin_gets(origin, "/gen/12m")) == 1
    assert origin.body_bytes == 12 * MiB
    _nothing_stored(relay, tmp_path)
    assert data_files(tmp_path / "cache") == []
    # The key is passed: the next GET is relayed at once.
    assert _fetch(relay, path) == expected_sha256(12 * MiB)
    assert len(origin_gets(origin, "/gen/12m")) == 2


def _clients(relay: RelayThread, path: str, count: int) -> list[str | BaseException]:
    """`count` whole GETs released together: each one's sha256, or what cut it."""
    out: list[str | BaseException] = [RuntimeError("not run")] * count
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = _fetch(relay, path)
        except (httpx.HTTPError, AssertionError) as exc:
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return out


def test_cache_chunked_body_over_the_object_limit_reaches_every_client_whole(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Item 12, several clients: one takes the live upstream response, the others continue
    from where the fill stopped with Range + If-Range on the strong ETag; all get the whole
    body, nothing is stored."""
    relay = cached(cache_max_object_bytes=4 * MiB)
    origin.reset_stats()
    path = f"/o/gen/12m?v=122&cl=0&slow={16 * MiB}"
    results = _clients(relay, path, 3)
    assert results == [expected_sha256(12 * MiB)] * 3
    settled(relay)
    gets = [r for r in origin.requests if r.path == "/gen/12m"]
    assert len(gets) <= 3
    continued = [r for r in gets if r.header("range") is not None]
    assert all(r.header("if-range") == '"gen-12582912-v122"' for r in continued)
    _nothing_stored(relay, tmp_path)
    assert data_files(tmp_path / "cache") == []


def test_cache_chunked_body_over_the_limit_without_continuation_aborts_the_others(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Item 12, several clients of a body that cannot be continued (its ETag changes on
    every request): one gets it whole, the other's transfer is aborted, never ended clean."""
    relay = cached(cache_max_object_bytes=4 * MiB)
    origin.reset_stats()
    path = f"/o/gen/12m?etag_changes=1&cl=0&slow={16 * MiB}"
    results = _clients(relay, path, 2)
    whole = [r for r in results if r == expected_sha256(12 * MiB)]
    cut = [r for r in results if isinstance(r, httpx.TransportError)]
    assert (len(whole), len(cut)) == (1, 1), results
    settled(relay)


def _nothing_stored(relay: RelayThread, tmp_path: Path) -> None:
    """No object stored: the cache's disk use is its (empty) directories alone."""
    metrics = _cache_metrics(relay)
    assert metrics["objects"] == 0
    assert metrics["size_bytes"] == disk_use(tmp_path / "cache")[0]
