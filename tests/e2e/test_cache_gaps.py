"""The read-through cache's harder cases end to end: stale-while-revalidate, bodies without a
Content-Length, whole GETs answered from slices, stale slices revalidated, digests of sliced
objects. A real relay under uvicorn in front of the test origin, counting the origin's requests
and body bytes; every body is checked by sha256."""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from relay.cache.clock import ManualClock
from tests.e2e.caching import MakeRelay, aria2c, caching_relay
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.e2e.caching import data_files as _data_files
from tests.e2e.caching import origin_gets as _gets
from tests.e2e.caching import settled as _settled
from tests.harness import RelayThread, curl, sha256_stream, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


def _get(relay: RelayThread, path: str, **headers: str) -> httpx.Response:
    return httpx.get(relay.url + path, headers=headers, timeout=30)


def _sha(response: httpx.Response) -> str:
    return hashlib.sha256(response.content).hexdigest()


def _versioned(size: int, version: int, start: int = 0, stop: int | None = None) -> str:
    """The sha256 of bytes [start, stop) of version `version` of a `vkey` object."""
    end = size if stop is None else stop
    return expected_sha256(size + version, start + version, end + version)


def _concurrently(
    count: int, work: Callable[[int], None], meanwhile: Callable[[], None] | None = None
) -> None:
    """Run `work(i)` in `count` threads released together; `meanwhile` runs before they are
    joined."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            work(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    try:
        if meanwhile is not None:
            meanwhile()
    finally:
        for t in threads:
            t.join(60)
    assert errors == []


# ---- stale-while-revalidate --------------------------------------------------------------------


SWR = 'relay; hit; fwd=stale; detail="stale-while-revalidate"'


def test_cache_stale_while_revalidate_one_conditional_then_fresh(
    origin: Origin, cached: Callable[..., RelayThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stale within stale-while-revalidate: ten concurrent clients are all answered from the
    cache while the one conditional request is held at the origin; after the 304 the entry
    is fresh again. Time moves on one clock, the relay's and the origin's."""
    clock = ManualClock(now=time.time())
    monkeypatch.setattr(origin, "clock", clock.now)  # the origin is the session's
    relay = cached(clock=clock)
    origin.set_version("swr304", 5)
    origin.close_gate("swr304")
    size = 64 * 1024
    path = "/o/gen/64k?vkey=swr304&cc=max-age=2,stale-while-revalidate=60&gate=swr304"
    first = _get(relay, path)
    assert first.headers["cache-status"] == "relay; fwd=miss"
    assert _sha(first) == _versioned(size, 5)
    _settled(relay)
    clock.advance(2.05)  # max-age=2 has passed whatever the Date's rounding: stale
    origin.reset_stats()
    statuses: list[str] = []

    def client(_: int) -> None:
        response = _get(relay, path)
        assert response.status_code == 200
        assert _sha(response) == _versioned(size, 5)
        statuses.append(response.headers["cache-status"])

    _concurrently(10, client)
    # Every client was answered from the stale copy while the one revalidation was held.
    assert statuses == [SWR] * 10
    assert len(origin.requests) == 1
    origin.open_gate("swr304")
    _settled(relay)
    (request,) = [r for r in origin.requests if r.path == "/gen/64k"]
    assert request.header("if-none-match") == '"gen-65536-v5"'
    assert origin.body_bytes == 0
    fresh = _get(relay, path)
    assert fresh.headers["cache-status"].startswith("relay; hit; ttl=")
    assert _sha(fresh) == _versioned(size, 5)
    assert len(origin.requests) == 1
    assert _cache_metrics(relay)["stale_total"] == 10


def test_cache_stale_while_revalidate_new_version_is_served_next(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """The revalidation gets a 200 with a new ETag: the client that triggered it gets the old
    version whole, the next request the new version whole (never a splice)."""
    relay = cached()
    origin.set_version("swr200", 3)
    size = 256 * 1024
    path = "/o/gen/256k?vkey=swr200&cc=max-age=0,stale-while-revalidate=60"
    assert _sha(_get(relay, path)) == _versioned(size, 3)
    _settled(relay)
    origin.set_version("swr200", 4)
    origin.reset_stats()
    stale = _get(relay, path)
    assert stale.headers["cache-status"] == SWR
    assert stale.headers["etag"] == '"gen-262144-v3"'
    assert _sha(stale) == _versioned(size, 3)
    _settled(relay)
    assert origin.body_bytes == size  # the new version, fetched once in the background
    # One request, conditional on the stored version; answered 200 (the body bytes above).
    (request,) = [r for r in origin.requests if r.path == "/gen/256k" and r.method == "GET"]
    assert request.header("if-none-match") == '"gen-262144-v3"'
    new = _get(relay, path)
    assert new.headers["etag"] == '"gen-262144-v4"'
    assert new.headers["cache-status"] == SWR  # max-age=0: served, and revalidated (304)
    assert _sha(new) == _versioned(size, 4)
    _settled(relay)
    assert origin.body_bytes == size


# ---- bodies without a Content-Length -----------------------------------------------------------


def test_cache_chunked_body_is_stored_and_served_with_a_length(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A chunked upstream body: clients attached during the fill get it chunked; once stored,
    hits carry Content-Length and Accept-Ranges, and ranges are answered from it."""
    relay = cached()
    origin.reset_stats()
    size = 3 * MiB
    path = f"/o/gen/3m?v=71&cl=0&slow={6 * MiB}"
    results: list[tuple[str, int, str | None, str | None]] = []

    def client(_: int) -> None:
        with httpx.stream("GET", relay.url + path, timeout=30) as response:
            digest, got = sha256_stream(response)
            results.append(
                (
                    digest,
                    got,
                    response.headers.get("content-length"),
                    response.headers.get("transfer-encoding"),
                )
            )

    _concurrently(3, client)
    assert results == [(expected_sha256(size), size, None, "chunked")] * 3
    assert len(_gets(origin, "/gen/3m")) == 1
    assert origin.body_bytes == size
    _settled(relay)
    hit = _get(relay, path)
    assert hit.headers["cache-status"].startswith("relay; hit")
    assert hit.headers["content-length"] == str(size)
    assert hit.headers["accept-ranges"] == "bytes"
    assert "transfer-encoding" not in hit.headers
    assert _sha(hit) == expected_sha256(size)
    part = _get(relay, path, range="bytes=1000000-2000000")
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000000-2000000/{size}"
    assert _sha(part) == expected_sha256(size, 1000000, 2000001)
    assert origin.body_bytes == size


def test_cache_close_delimited_body_is_stored_only_when_a_digest_verifies_it(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """HTTP/1.0 without Content-Length (the body ends at close): a cut would look complete,
    so it is stored only when the upstream announced a digest, checked before publishing; a
    wrong digest aborts the client and stores nothing; without a digest its one fill answers
    the client, not stored."""
    relay = cached()
    size = 1 * MiB
    verified = "/o/gen/1m?v=72&http10=1&repr_digest=good"
    origin.reset_stats()
    first = _get(relay, verified)
    assert first.headers["cache-status"] == "relay; fwd=miss"
    assert _sha(first) == expected_sha256(size)
    _settled(relay)
    hit = _get(relay, verified)
    assert hit.headers["cache-status"].startswith("relay; hit")
    assert hit.headers["content-length"] == str(size)
    assert hit.headers["accept-ranges"] == "bytes"
    assert _sha(hit) == expected_sha256(size)
    assert origin.body_bytes == size
    stored = len(_data_files(tmp_path / "cache"))
    assert stored == 1

    # Unsized: the bytes are sent as they come, but the body's end only once verified.
    code, _, got = curl(relay.url + "/o/gen/1m?v=73&http10=1&repr_digest=bad")
    assert code in (18, 56)
    assert got <= size
    _settled(relay)
    assert _cache_metrics(relay)["digest_mismatches_total"] == 1

    origin.reset_stats()
    for _ in range(2):
        plain = _get(relay, "/o/gen/1m?v=74&http10=1")
        assert plain.headers["cache-status"] == "relay; fwd=miss; fwd-status=200"
        assert _sha(plain) == expected_sha256(size)
        _settled(relay)
    assert len(_gets(origin, "/gen/1m")) == 2  # one upstream request each
    assert len(_data_files(tmp_path / "cache")) == stored


def test_cache_chunked_upstream_death_aborts_and_stores_nothing(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A chunked body the upstream does not finish (and that cannot be resumed): the client's
    transfer is aborted (curl exit 18/56, never a clean short body) and nothing is stored."""
    relay = cached(resume_attempts=1)
    code, _, got = curl(relay.url + "/o/gen/2m?v=75&chunked_die=300000&etag_changes=1")
    assert code in (18, 56)
    assert got <= 300000
    _settled(relay)
    assert _data_files(tmp_path / "cache") == []


# ---- a whole GET from stored slices -----------------------------------------------------------


def test_cache_whole_get_reuses_stored_slices(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Ranges store slices 0 and 2 of a 4 MiB object; a whole GET is then one 200 stitched
    from them, only slices 1 and 3 fetched (with If-Range): the origin sends the object
    once. Again, HEAD, a conditional GET and a Range are all answered from the slices."""
    relay = cached()
    size = 4 * MiB
    path = "/o/gen/4m?v=76"
    origin.reset_stats()
    for first in (0, 2 * MiB):
        part = _get(relay, path, range=f"bytes={first}-{first + MiB - 1}")
        assert part.status_code == 206
        assert _sha(part) == expected_sha256(size, first, first + MiB)
    _settled(relay)
    assert origin.body_bytes == 2 * MiB
    whole = _get(relay, path)
    assert whole.status_code == 200
    assert whole.headers["cache-status"] == "relay; fwd=miss"
    assert whole.headers["content-length"] == str(size)
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["etag"] == '"gen-4194304-v76"'
    assert "content-range" not in whole.headers
    assert _sha(whole) == expected_sha256(size)
    _settled(relay)
    assert origin.body_bytes == size
    gets = [r for r in origin.requests if r.path == "/gen/4m"]
    assert [r.header("range") for r in gets[2:]] == [
        f"bytes={MiB}-{2 * MiB - 1}",
        f"bytes={3 * MiB}-{4 * MiB - 1}",
    ]
    assert {r.header("if-range") for r in gets[2:]} == {'"gen-4194304-v76"'}

    again = _get(relay, path)
    assert again.headers["cache-status"].startswith("relay; hit; ttl=")
    assert _sha(again) == expected_sha256(size)
    head = httpx.head(relay.url + path)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(size)
    assert head.headers["cache-status"].startswith("relay; hit")
    assert _get(relay, path, **{"if-none-match": '"gen-4194304-v76"'}).status_code == 304
    tail = _get(relay, path, range=f"bytes={size - 10}-")
    assert tail.status_code == 206
    assert _sha(tail) == expected_sha256(size, size - 10)
    assert len(gets) == len([r for r in origin.requests if r.path == "/gen/4m"])
    assert origin.body_bytes == size


def test_cache_whole_get_joins_slice_fills_in_flight(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A whole GET arriving while a Range's slice is still being fetched reads that fill:
    the origin sends each byte once."""
    relay = cached()
    size = 4 * MiB
    path = f"/o/gen/4m?v=77&slow={8 * MiB}"
    origin.reset_stats()
    parts: list[str] = []
    ranged = threading.Thread(
        target=lambda: parts.append(_sha(_get(relay, path, range="bytes=0-99")))
    )
    ranged.start()
    assert wait_until(lambda: origin.body_bytes > 0)  # slice 0 is being fetched
    whole = _get(relay, path)
    ranged.join(30)
    assert parts == [expected_sha256(size, 0, 100)]
    assert whole.status_code == 200
    assert _sha(whole) == expected_sha256(size)
    _settled(relay)
    assert origin.body_bytes == size
    assert len(_gets(origin, "/gen/4m")) == 4


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
def test_cache_ranges_then_aria2c_cost_the_object_once(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Part of an object fetched by ranges, then aria2c -x16 (its first connection a whole
    GET): the upstream sends the object's bytes once in all."""
    relay = cached()
    size = 8 * MiB
    path = "/o/gen/8m?v=78"
    origin.reset_stats()
    assert _sha(_get(relay, path, range=f"bytes=0-{2 * MiB - 1}")) == expected_sha256(
        size, 0, 2 * MiB
    )
    data = aria2c(relay.url + path, tmp_path / "out.bin")
    assert hashlib.sha256(data).hexdigest() == expected_sha256(size)
    _settled(relay)
    assert origin.body_bytes == size


def test_cache_whole_get_from_slices_never_joins_two_versions(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Slice 0 is stored from version 1; the object changes; a whole GET sends slice 0, then
    slice 1 comes back as another version (If-Range answered 200): the transfer is aborted
    and the slices dropped; the next whole GET is version 2, whole."""
    relay = cached()
    size = 2 * MiB
    origin.set_version("whole2v", 1)
    path = "/o/gen/2m?vkey=whole2v"
    assert _sha(_get(relay, path, range="bytes=0-99")) == _versioned(size, 1, 0, 100)
    _settled(relay)
    origin.set_version("whole2v", 2)
    code, _, got = curl(relay.url + path)
    assert code in (18, 56)
    assert got <= MiB
    _settled(relay)
    origin.reset_stats()
    again = _get(relay, path)
    assert again.status_code == 200
    assert again.headers["etag"] == '"gen-2097152-v2"'
    assert _sha(again) == _versioned(size, 2)
    assert origin.body_bytes == size


# ---- stale slices are revalidated --------------------------------------------------------------


def test_cache_stale_slices_are_revalidated_by_one_conditional_request(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Eight clients ask ranges of a stale sliced object (max-age=0) at once: one conditional
    Range request (If-None-Match), held at the origin until all eight wait on it, answered
    304, refreshes every slice; no byte is fetched again."""
    relay = cached()
    size = 4 * MiB
    path = "/o/gen/4m?v=79&cc=max-age=0&gate=slices304"
    whole = _get(relay, path, range=f"bytes=0-{size - 1}")
    assert _sha(whole) == expected_sha256(size)
    _settled(relay)
    origin.close_gate("slices304")
    origin.reset_stats()
    statuses: list[str] = []

    def client(i: int) -> None:
        first = i * MiB // 2
        response = _get(relay, path, range=f"bytes={first}-{first + MiB}")
        assert response.status_code == 206
        assert _sha(response) == expected_sha256(size, first, min(size, first + MiB + 1))
        statuses.append(response.headers["cache-status"])

    def all_waiting() -> None:
        try:
            assert wait_until(lambda: relay.streams_active() == 8 and len(origin.requests) == 1)
        finally:
            origin.open_gate("slices304")

    _concurrently(8, client, all_waiting)
    assert statuses == ["relay; fwd=stale; fwd-status=304"] * 8
    (request,) = [r for r in origin.requests if r.path == "/gen/4m"]
    assert request.header("if-none-match") == '"gen-4194304-v79"'
    assert (request.header("range") or "").startswith("bytes=")
    assert origin.body_bytes == 0
    _settled(relay)
    assert _cache_metrics(relay)["revalidations_total"] == 1


def test_cache_stale_slices_of_a_changed_object_are_replaced(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """The conditional request for a stale slice gets a 206 of a new version: every old slice
    is dropped, that answer is stored as the new slice, the rest of the new version is
    fetched slice by slice, and no response mixes versions."""
    relay = cached()
    size = 2 * MiB
    origin.set_version("slices2v", 1)
    path = "/o/gen/2m?vkey=slices2v&cc=max-age=0"
    assert _sha(_get(relay, path, range=f"bytes=0-{size - 1}")) == _versioned(size, 1)
    _settled(relay)
    origin.set_version("slices2v", 2)
    origin.reset_stats()
    head = _get(relay, path, range="bytes=0-99")
    assert head.status_code == 206
    assert head.headers["etag"] == '"gen-2097152-v2"'
    assert _sha(head) == _versioned(size, 2, 0, 100)
    _settled(relay)
    (conditional,) = [r for r in origin.requests if r.path == "/gen/2m"]
    assert conditional.header("if-none-match") == '"gen-2097152-v1"'
    assert origin.body_bytes == MiB
    rest = _get(relay, path, range=f"bytes={MiB}-")
    assert rest.headers["etag"] == '"gen-2097152-v2"'
    assert _sha(rest) == _versioned(size, 2, MiB)
    _settled(relay)
    assert origin.body_bytes == size
    whole = _get(relay, path)
    assert whole.status_code == 200
    assert _sha(whole) == _versioned(size, 2)
    assert origin.body_bytes == size


def test_cache_stale_slices_served_on_upstream_error_when_allowed(
    cached: Callable[..., RelayThread],
) -> None:
    """The revalidation of stale slices fails (the upstream is down): with stale-if-error the
    stale slices answer (and are kept); without it the client gets the relayed 502."""
    from relay.config import Route

    down = Origin().start()
    routes = (Route(prefix="/d/", upstream=down.url + "/", allow_private=True),)
    relay = cached(routes=routes)
    size = 2 * MiB
    allowed = "/d/gen/2m?v=84&cc=max-age=0,stale-if-error=600"
    silent = "/d/gen/2m?v=85&cc=max-age=0"
    for path in (allowed, silent):
        assert _sha(_get(relay, path, range="bytes=0-99")) == expected_sha256(size, 0, 100)
    _settled(relay)
    down.stop()
    stale = _get(relay, allowed, range="bytes=100-199")
    assert stale.status_code == 206
    assert stale.headers["cache-status"] == (
        'relay; hit; fwd=stale; fwd-status=502; detail="stale-if-error"'
    )
    assert _sha(stale) == expected_sha256(size, 100, 200)
    assert _get(relay, silent, range="bytes=100-199").status_code == 502
    _settled(relay)
    assert _cache_metrics(relay)["stale_total"] == 1


# ---- digests of sliced objects ----------------------------------------------------------------


def test_cache_sliced_object_is_checked_against_its_repr_digest(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Once every slice of an object with a Repr-Digest is stored, they are hashed in order:
    a match keeps them; a mismatch drops them all and is counted."""
    relay = cached()
    size = 2 * MiB
    good = "/o/gen/2m?v=80&repr_digest=good"
    assert _sha(_get(relay, good, range=f"bytes=0-{size - 1}")) == expected_sha256(size)
    _settled(relay)
    assert len(_data_files(tmp_path / "cache")) == 2
    assert _cache_metrics(relay)["digest_mismatches_total"] == 0
    origin.reset_stats()
    assert _get(relay, good).headers["cache-status"].startswith("relay; hit")
    assert origin.body_bytes == 0

    bad = "/o/gen/2m?v=81&repr_digest=bad"
    assert _sha(_get(relay, bad, range=f"bytes=0-{MiB - 1}")) == expected_sha256(size, 0, MiB)
    _settled(relay)
    assert _cache_metrics(relay)["digest_mismatches_total"] == 0  # one slice: not judged yet
    assert _sha(_get(relay, bad, range=f"bytes={MiB}-")) == expected_sha256(size, MiB)
    assert wait_until(lambda: _cache_metrics(relay)["digest_mismatches_total"] == 1)
    _settled(relay)
    assert len(_data_files(tmp_path / "cache")) == 2  # only the good object's slices
    origin.reset_stats()
    assert _get(relay, bad, range="bytes=0-99").headers["cache-status"] == "relay; fwd=miss"
    assert origin.body_bytes == MiB


def test_cache_slice_content_digest_is_verified(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A 206 announcing the Content-Digest of its bytes: a slice that matches is stored; one
    that does not aborts the client and is not stored."""
    relay = cached()
    size = 2 * MiB
    good = "/o/gen/2m?v=82&content_digest=good"
    assert _sha(_get(relay, good, range="bytes=10-99")) == expected_sha256(size, 10, 100)
    _settled(relay)
    assert _get(relay, good, range="bytes=0-9").headers["cache-status"].startswith("relay; hit")
    code, _, got = curl(relay.url + "/o/gen/2m?v=83&content_digest=bad", "-r", "10-99")
    assert code in (18, 56)
    assert got < 90  # the range's last byte waits for the slice to be verified
    _settled(relay)
    assert _cache_metrics(relay)["digest_mismatches_total"] == 1
    assert len(_data_files(tmp_path / "cache")) == 1
