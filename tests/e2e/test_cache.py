"""The read-through cache end to end: a real relay under uvicorn in front of the test origin,
counting the origin's requests and body bytes."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import Route
from tests.e2e.caching import MakeRelay, aria2c, caching_relay, disk_use, meta_files, stored_data
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.e2e.caching import data_files as _data_files
from tests.e2e.caching import origin_gets as _gets
from tests.e2e.caching import settled as _settled
from tests.harness import RelayThread, abort_download, curl, sha256_stream, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


def test_cache_miss_is_stored_then_hit_from_disk(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """The first GET is fetched once and stored; the second is answered from disk."""
    relay = cached()
    origin.reset_stats()
    url = f"{relay.url}/o/gen/1m?v=11"
    first = httpx.get(url)
    assert first.status_code == 200
    assert first.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(first.content).hexdigest() == expected_sha256(MiB)
    assert wait_until(lambda: any(stored_data(tmp_path / "cache")))
    second = httpx.get(url)
    assert second.status_code == 200
    assert second.headers["cache-status"].startswith("relay; hit")
    assert second.headers["content-length"] == str(MiB)
    assert second.headers["etag"] == first.headers["etag"]
    assert second.headers["accept-ranges"] == "bytes"
    assert int(second.headers["age"]) >= 0
    assert hashlib.sha256(second.content).hexdigest() == expected_sha256(MiB)
    assert len(_gets(origin, "/gen/1m")) == 1
    assert origin.body_bytes == MiB
    head = httpx.head(url)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(MiB)
    assert head.headers["cache-status"].startswith("relay; hit")
    assert len(_gets(origin, "/gen/1m")) == 1
    metrics = _cache_metrics(relay)
    assert (metrics["hits_total"], metrics["misses_total"]) == (2, 1)
    assert metrics["bytes_from_upstream_total"] == MiB
    assert metrics["bytes_from_cache_total"] == MiB  # the HEAD sent no body
    assert metrics["objects"] == 1
    # Disk space: the data and its record rounded up to blocks, and the directories.
    assert metrics["size_bytes"] == disk_use(tmp_path / "cache")[0] > MiB


def test_cache_sixteen_clients_coalesce_from_the_first_byte(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """16 concurrent clients of a 64 MiB rate-limited object: one upstream fetch of each
    byte, every body exact, and every client's first byte arrives before the fill ends."""
    relay = cached()
    origin.reset_stats()
    size = 64 * MiB
    url = f"{relay.url}/o/gen/64m?v=12&slow={48 * MiB}"
    results: list[tuple[str, int, int]] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)
    lock = threading.Lock()

    def client() -> None:
        try:
            start.wait()
            with httpx.stream("GET", url, timeout=60) as response:
                assert response.status_code == 200
                digest = hashlib.sha256()
                first_at: int | None = None
                got = 0
                for chunk in response.iter_raw():
                    if first_at is None:
                        first_at = origin.body_bytes  # the origin's progress at our first byte
                    digest.update(chunk)
                    got += len(chunk)
            with lock:
                results.append((digest.hexdigest(), got, first_at or size))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert len(results) == 16
    expected = expected_sha256(size)
    assert all(digest == expected and got == size for digest, got, _ in results)
    assert len(_gets(origin, "/gen/64m")) == 1
    assert origin.body_bytes == size
    # Each client had bytes while the origin was still sending: none waited for the fill.
    assert max(first for _, _, first in results) < size
    _settled(relay)
    assert _cache_metrics(relay)["coalesced_total"] == 15


def _status(relay: RelayThread, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(f"{relay.url}{path}", timeout=30, **kwargs)


def test_cache_client_killed_mid_fill_others_continue(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A client reset mid-fill leaves the others' transfers and the fill untouched."""
    relay = cached()
    origin.reset_stats()
    path = f"/o/gen/8m?v=13&slow={4 * MiB}"
    results: list[str] = []

    def full() -> None:
        with httpx.stream("GET", relay.url + path, timeout=60) as response:
            results.append(sha256_stream(response)[0])

    others = [threading.Thread(target=full) for _ in range(2)]
    for t in others:
        t.start()
    assert wait_until(lambda: origin.body_bytes > 0)
    abort_download(relay.port, path, 512 * 1024)
    for t in others:
        t.join(60)
    assert results == [expected_sha256(8 * MiB)] * 2
    assert len(_gets(origin, "/gen/8m")) == 1
    assert origin.body_bytes == 8 * MiB
    _settled(relay)


def test_cache_only_client_leaving_fill_completes(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """When the only client leaves, the fill goes on; the next request is a hit."""
    relay = cached()
    origin.reset_stats()
    path = f"/o/gen/4m?v=14&slow={4 * MiB}"
    abort_download(relay.port, path, 256 * 1024)
    assert wait_until(lambda: origin.body_bytes == 4 * MiB)
    _settled(relay)
    again = _status(relay, path)
    assert again.headers["cache-status"].startswith("relay; hit")
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(4 * MiB)
    assert len(_gets(origin, "/gen/4m")) == 1


def test_cache_fill_resumes_with_a_strong_validator(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """An upstream cut mid-fill is resumed (Range + If-Range): the client's body is exact
    and the object is stored."""
    relay = cached()
    origin.reset_stats()
    path = "/o/gen/2m?v=15&drop_once=300000&key=c15"
    with httpx.stream("GET", relay.url + path, timeout=30) as response:
        assert response.headers["cache-status"] == "relay; fwd=miss"
        assert sha256_stream(response) == (expected_sha256(2 * MiB), 2 * MiB)
    gets = [r for r in origin.requests if r.path == "/gen/2m"]
    assert len(gets) == 2
    assert (gets[1].header("range") or "").endswith("-2097151")
    assert gets[1].header("if-range") == '"gen-2097152-v15"'
    _settled(relay)
    assert _status(relay, path).headers["cache-status"].startswith("relay; hit")


def test_cache_upstream_death_without_resume_aborts_and_stores_nothing(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A fill that cannot be resumed (the object changes on every request) aborts every
    attached client (curl exit 18) and publishes nothing."""
    relay = cached(resume_attempts=1)
    origin.reset_stats()
    path = "/o/gen/2m?v=16&etag_changes=1&close_after=500000"
    code, _, size = curl(relay.url + path)
    assert code in (18, 56)
    assert size < 2 * MiB
    _settled(relay)
    assert _data_files(tmp_path / "cache") == []


def test_cache_upstream_death_no_strong_validator_aborts(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Without resume (resume_attempts = 0 stands for an upstream with no strong validator:
    nothing may be continued), a cut fill aborts the client and stores nothing."""
    relay = cached(resume_attempts=0)
    origin.reset_stats()
    code, _, size = curl(relay.url + "/o/gen/2m?v=17&close_after=400000")
    assert code in (18, 56)
    assert size < 2 * MiB
    _settled(relay)
    assert _data_files(tmp_path / "cache") == []


def test_cache_restart_mid_fill_serves_nothing_incomplete(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """What a relay killed mid-fill leaves (a version's data published but its record not
    yet written, a fill's partial file, a data file no record names) is never served: the
    next relay removes it and fetches whole."""
    first = cached()
    path = "/o/gen/2m?v=18"
    assert _status(first, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(first)
    first.stop()
    root = tmp_path / "cache"
    (meta,) = meta_files(root)
    digest = meta.name.split(".")[0]
    meta.unlink()
    (meta.parent / f"{digest}.{'1' * 16}.partial").write_bytes(b"x" * 1000)
    stray = root / "objects" / "ab" / ("ab" + "0" * 62 + "." + "2" * 16 + ".data")
    stray.parent.mkdir(exist_ok=True)
    stray.write_bytes(b"half")
    origin.reset_stats()
    second = cached()
    assert _data_files(root) == []
    again = _status(second, path)
    assert again.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(2 * MiB)
    assert origin.body_bytes == 2 * MiB
    assert not stray.parent.exists()  # its bucket, left empty, too


def test_cache_survives_a_restart(origin: Origin, cached: Callable[..., RelayThread]) -> None:
    first = cached()
    path = "/o/gen/1m?v=19"
    assert _status(first, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(first)
    first.stop()
    origin.reset_stats()
    second = cached()
    again = _status(second, path)
    assert again.headers["cache-status"].startswith("relay; hit")
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(MiB)
    assert _gets(origin, "/gen/1m") == []


_NOT_STORED = "relay; fwd=miss; fwd-status=200"


@pytest.mark.parametrize(
    ("query", "statuses", "gets"),
    [
        # Answered from the fill, not stored; the next request is filled again.
        ("cc=no-store", [_NOT_STORED, _NOT_STORED], 2),
        # Answered from the fill to the client that caused it; then relayed (pass).
        ("cc=private,max-age=60", [_NOT_STORED, None], 2),
        # Varies on a header the fill does not send as the client does: relayed.
        ("vary=User-Agent", [None, None], 3),
    ],
)
def test_cache_does_not_store(
    origin: Origin,
    cached: Callable[..., RelayThread],
    tmp_path: Path,
    query: str,
    statuses: list[str | None],
    gets: int,
) -> None:
    """no-store, private and a Vary other than Accept-Encoding are not stored; the fill's
    answer serves the client that caused it where it may."""
    relay = cached()
    origin.reset_stats()
    for status in statuses:
        response = _status(relay, f"/o/gen/64k?v=20&{query}")
        assert response.status_code == 200
        assert response.headers.get("cache-status") == status
        assert hashlib.sha256(response.content).hexdigest() == expected_sha256(64 * 1024)
        _settled(relay)
    assert _data_files(tmp_path / "cache") == []
    assert len(_gets(origin, "/gen/64k")) == gets


def test_cache_vary_accept_encoding_keeps_one_variant_per_encoding(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """An identity client never gets the gzip variant, and each variant is then a hit."""
    relay = cached()
    origin.reset_stats()
    path = "/o/gen/64k?v=21&gzip=1"
    gz = {"accept-encoding": "gzip"}
    ident = {"accept-encoding": "identity"}
    for _ in range(2):
        for headers in (gz, ident, gz, ident):
            response = _status(relay, path, headers=headers)
            if headers is ident:
                assert "content-encoding" not in response.headers
                assert hashlib.sha256(response.content).hexdigest() == expected_sha256(64 * 1024)
            else:
                assert response.headers["content-encoding"] == "gzip"
        _settled(relay)
    assert _status(relay, path, headers=gz).headers["cache-status"].startswith("relay; hit")
    last = _status(relay, path, headers=ident)
    assert last.headers["cache-status"].startswith("relay; hit")
    assert "content-encoding" not in last.headers


def test_cache_revalidates_with_one_conditional_request(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A stale entry is refreshed by a 304 without refetching bytes."""
    relay = cached()
    origin.reset_stats()
    path = "/o/gen/256k?v=22&cc=max-age=0"
    assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    again = _status(relay, path)
    assert again.status_code == 200
    assert again.headers["cache-status"] == "relay; fwd=stale; fwd-status=304"
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(256 * 1024)
    gets = [r for r in origin.requests if r.path == "/gen/256k"]
    assert len(gets) == 2
    assert gets[1].header("if-none-match") == '"gen-262144-v22"'
    assert origin.body_bytes == 256 * 1024


def test_cache_changed_object_replaces_the_entry(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A revalidation answered 200 (the object changed) stores the new version."""
    relay = cached()
    path = "/o/gen/256k?v=23&cc=max-age=0&etag_changes=1"
    first = _status(relay, path)
    _settled(relay)
    second = _status(relay, path)
    assert second.headers["cache-status"] == "relay; fwd=stale"
    assert second.headers["etag"] != first.headers["etag"]
    assert hashlib.sha256(second.content).hexdigest() == expected_sha256(256 * 1024)


def test_cache_client_conditionals_and_ranges_on_a_hit(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    relay = cached()
    path = "/o/gen/1m?v=24"
    etag = _status(relay, path).headers["etag"]
    _settled(relay)
    assert _status(relay, path, headers={"if-none-match": etag}).status_code == 304
    part = _status(relay, path, headers={"range": "bytes=100-199"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 100-199/{MiB}"
    assert hashlib.sha256(part.content).hexdigest() == expected_sha256(MiB, 100, 200)
    assert _status(relay, path, headers={"range": f"bytes={MiB}-"}).status_code == 416
    stale_if_range = {"range": "bytes=0-9", "if-range": '"other"'}
    assert _status(relay, path, headers=stale_if_range).status_code == 200


def test_cache_stale_if_error_with_the_origin_down(
    cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A stale object is served when the upstream is down and allowed it (stale-if-error);
    without that allowance the client gets the 502 a relayed request would."""
    from relay.config import Route

    down = Origin().start()
    routes = (Route(prefix="/d/", upstream=down.url + "/", allow_private=True),)
    relay = cached(routes=routes)
    allowed = "/d/gen/64k?v=25&cc=max-age=0,stale-if-error=600"
    silent = "/d/gen/64k?v=26&cc=max-age=0"
    for path in (allowed, silent):
        assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    down.stop()
    stale = _status(relay, allowed)
    assert stale.status_code == 200
    assert stale.headers["cache-status"].startswith("relay; hit; fwd=stale; fwd-status=502")
    assert hashlib.sha256(stale.content).hexdigest() == expected_sha256(64 * 1024)
    assert _status(relay, silent).status_code == 502


def test_cache_purge_needs_the_admin_credential(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    relay = cached(admin_token="sesame")
    path = "/o/gen/64k?v=27"
    _status(relay, path)
    _settled(relay)
    assert httpx.delete(f"{relay.url}/cache{path}").status_code == 401
    assert (
        httpx.delete(
            f"{relay.url}/cache{path}", headers={"x-relay-admin-token": "wrong"}
        ).status_code
        == 403
    )
    assert _status(relay, path).headers["cache-status"].startswith("relay; hit")
    ok = httpx.delete(f"{relay.url}/cache{path}", headers={"x-relay-admin-token": "sesame"})
    assert ok.status_code == 200
    assert ok.json() == {"purged": 1}
    assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    purge = httpx.post(
        f"{relay.url}/cache/purge",
        json={"prefix": "/o/gen/"},
        headers={"x-relay-admin-token": "sesame"},
    )
    assert purge.json() == {"purged": 1}
    assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"


@pytest.mark.parametrize("body", [b"not json", b"[" * 5000, b"{" * 10 + b"}" * 10])
def test_cache_purge_with_a_body_that_is_not_json_is_a_400(
    cached: Callable[..., RelayThread], body: bytes
) -> None:
    """Not JSON, or nested deeper than the parser goes: a clear 400, never a 500."""
    relay = cached(admin_token="sesame")
    purge = httpx.post(
        f"{relay.url}/cache/purge", content=body, headers={"x-relay-admin-token": "sesame"}
    )
    assert purge.status_code == 400
    assert "JSON" in purge.text


def test_cache_prefetch_warms_an_object(origin: Origin, cached: Callable[..., RelayThread]) -> None:
    relay = cached(admin_token="sesame")
    origin.reset_stats()
    token = {"x-relay-admin-token": "sesame"}
    assert (
        httpx.post(f"{relay.url}/cache/prefetch", json={"path": "/o/gen/1m?v=28"}).status_code
        == 401
    )
    started = httpx.post(
        f"{relay.url}/cache/prefetch", json={"path": "/o/gen/1m?v=28"}, headers=token
    )
    assert started.status_code == 202
    _settled(relay)
    hit = _status(relay, "/o/gen/1m?v=28")
    assert hit.headers["cache-status"].startswith("relay; hit")
    assert origin.body_bytes == MiB


def test_cache_eviction_keeps_a_reader_streaming(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Past cache_max_bytes the least recently used object is evicted (unlinked): a client
    streaming it still gets every byte."""
    relay = cached(cache_max_bytes=3 * MiB, cache_max_object_bytes=2 * MiB)
    first, second = "/o/gen/2m?v=29", "/o/gen/2m?v=30"
    _status(relay, first)
    _settled(relay)
    with httpx.stream("GET", relay.url + first, timeout=30) as reading:
        assert reading.headers["cache-status"].startswith("relay; hit")
        chunks = reading.iter_raw()
        head = next(chunks)
        assert _status(relay, second).headers["cache-status"] == "relay; fwd=miss"
        digest = hashlib.sha256(head)
        for chunk in chunks:
            digest.update(chunk)
    assert digest.hexdigest() == expected_sha256(2 * MiB)
    assert _cache_metrics(relay)["evictions_total"] == 1
    assert _status(relay, first).headers["cache-status"] == "relay; fwd=miss"


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_cache_disk_full_stops_the_fill_cleanly(
    origin: Origin, make_relay: MakeRelay, tmp_path: Path
) -> None:
    """A full disk mid-fill aborts the attached client (never a short clean body), leaves
    nothing half-written, and relay keeps serving and caching what fits."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        relay = make_relay(cache_dir=str(mount), cache_max_bytes=100 * MiB)
        code, _, size = curl(relay.url + "/o/gen/16m?v=31")
        assert code in (18, 56)
        assert size < 16 * MiB
        _settled(relay)
        assert [p for p in mount.rglob("*") if p.suffix in (".data", ".partial")] == []
        small = _status(relay, "/o/gen/64k?v=31")
        assert small.status_code == 200
        assert hashlib.sha256(small.content).hexdigest() == expected_sha256(64 * 1024)
        _settled(relay)
        assert _status(relay, "/o/gen/64k?v=31").headers["cache-status"].startswith("relay; hit")
        relay.stop()
    finally:
        subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.skipif(shutil.which("aria2c") is None, reason="aria2c is not installed")
def test_cache_aria2c_sixteen_connections_cold_then_warm(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """aria2c -x16 on a cold object costs the upstream each byte once; warm, nothing."""
    relay = cached()
    size = 32 * MiB
    path = f"/o/gen/32m?v=32&slow={32 * MiB}"
    for round_, out in enumerate(("cold.bin", "warm.bin")):
        origin.reset_stats()
        data = aria2c(relay.url + path, tmp_path / out)
        assert hashlib.sha256(data).hexdigest() == expected_sha256(size)
        _settled(relay)
        assert origin.body_bytes == (size if round_ == 0 else 0)


def test_cache_slow_readers_hold_no_upstream_connection(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Clients that stop reading on a cached route do not hold the upstream: the fill runs at
    the upstream's speed, finishes and returns its connection while they still read."""
    relay = cached()
    origin.reset_stats()
    size = 8 * MiB
    path = "/o/gen/8m?v=33"
    streams = [httpx.stream("GET", relay.url + path, timeout=30) for _ in range(8)]
    responses = [s.__enter__() for s in streams]
    try:
        iterators = [r.iter_raw() for r in responses]
        digests = [hashlib.sha256(next(it)) for it in iterators]
        # Every client has read one chunk and stopped; the fill completes without them.
        assert wait_until(lambda: origin.body_bytes == size)
        assert wait_until(lambda: not any("Cache._run" in t for t in relay.stray_tasks()))
        assert wait_until(lambda: relay.connections_in_use() == 0)
        assert len(_gets(origin, "/gen/8m")) == 1
        for digest, it in zip(digests, iterators, strict=True):
            for chunk in it:
                digest.update(chunk)
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    assert [d.hexdigest() for d in digests] == [expected_sha256(size)] * 8


def test_cache_verifies_the_announced_digest(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A Repr-Digest that matches lets the object be stored; one that does not aborts the
    client before the last byte, stores nothing and is counted."""
    relay = cached()
    good = _status(relay, "/o/gen/256k?v=34&repr_digest=good")
    assert good.headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    assert (
        _status(relay, "/o/gen/256k?v=34&repr_digest=good")
        .headers["cache-status"]
        .startswith("relay; hit")
    )
    code, _, size = curl(relay.url + "/o/gen/256k?v=35&repr_digest=bad")
    assert code in (18, 56)
    assert size < 256 * 1024
    _settled(relay)
    assert _cache_metrics(relay)["digest_mismatches_total"] == 1
    assert len(_data_files(tmp_path / "cache")) == 1


def test_cache_cold_range_costs_the_upstream_at_most_a_slice(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A 1 MiB range of a cold 256 MiB object fetches only the slice it covers; asked again it
    is a hit; a range across that slice and the next fetches only the missing slice."""
    relay = cached(cache_max_object_bytes=256 * MiB)  # cache_slice_bytes = 1 MiB
    path = "/o/gen/256m?v=36"
    total = 256 * MiB

    def get(first: int, last: int) -> httpx.Response:
        response = _status(relay, path, headers={"range": f"bytes={first}-{last}"})
        assert response.status_code == 206
        assert response.headers["content-range"] == f"bytes {first}-{last}/{total}"
        expected = expected_sha256(total, first, last + 1)
        assert hashlib.sha256(response.content).hexdigest() == expected
        _settled(relay)
        return response

    origin.reset_stats()
    cold = get(100 * MiB, 101 * MiB - 1)
    assert cold.headers["cache-status"] == "relay; fwd=miss"
    assert origin.body_bytes == MiB
    (request,) = [r for r in origin.requests if r.path == "/gen/256m"]
    assert request.header("range") == f"bytes={100 * MiB}-{101 * MiB - 1}"
    origin.reset_stats()
    assert get(100 * MiB + 5, 100 * MiB + 99).headers["cache-status"].startswith("relay; hit")
    assert origin.body_bytes == 0
    get(100 * MiB + MiB // 2, 101 * MiB + MiB // 2)
    assert origin.body_bytes == MiB
    (request,) = [r for r in origin.requests if r.path == "/gen/256m"]
    assert request.header("if-range") == '"gen-268435456-v36"'


def test_cache_object_changed_between_slices_aborts(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A slice answered by another version (If-Range fails: 200) is never joined to the
    first: the client's transfer is aborted and the object's slices are dropped."""
    relay = cached()
    path = "/o/gen/4m?v=37&etag_changes=1"
    code, _, size = curl(relay.url + path, "-r", f"{MiB // 2}-{MiB + MiB // 2}")
    assert code in (18, 56)
    assert size <= MiB // 2
    _settled(relay)
    origin.reset_stats()
    # Nothing of the old version is served: the first slice is fetched again.
    again = _status(relay, path, headers={"range": "bytes=0-99"})
    assert again.status_code == 206
    assert origin.body_bytes == MiB


def test_cache_many_clients_of_a_stale_object_send_one_conditional_request(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Eight clients of a stale object wait on one revalidation (the origin holds it until all
    eight are waiting, counted, not timed): one conditional request, no body."""
    relay = cached()
    path = "/o/gen/64k?v=38&cc=max-age=0&gate=stale38"
    _status(relay, path)
    _settled(relay)
    origin.close_gate("stale38")
    origin.reset_stats()
    statuses: list[str] = []

    def client() -> None:
        response = _status(relay, path)
        assert hashlib.sha256(response.content).hexdigest() == expected_sha256(64 * 1024)
        statuses.append(response.headers["cache-status"])

    threads = [threading.Thread(target=client) for _ in range(8)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: relay.streams_active() == 8 and len(origin.requests) == 1)
    finally:
        origin.open_gate("stale38")
    for t in threads:
        t.join(30)
    assert statuses == ["relay; fwd=stale; fwd-status=304"] * 8
    (request,) = [r for r in origin.requests if r.path == "/gen/64k"]
    assert request.header("if-none-match") == '"gen-65536-v38"'
    assert origin.body_bytes == 0


def test_cache_small_hit_answers_as_a_streamed_hit_does(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A hit of at most 16 KiB leaves in one message, with the very head (names, order,
    values) and bytes a hit streamed from the file has, for GET, HEAD, ranges and
    conditionals."""
    relay = cached()
    origin.reset_stats()
    small, big = "/o/gen/1k?v=40", "/o/gen/64k?v=40"
    for path in (small, big):
        assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    before = _cache_metrics(relay)
    hits = {path: _status(relay, path) for path in (small, big)}

    def shape(response: httpx.Response) -> list[tuple[str, str]]:
        varying = ("date", "content-length", "etag", "x-request-id", "cache-status", "age")
        return [(n, "" if n in varying else v) for n, v in response.headers.multi_items()]

    assert shape(hits[small]) == shape(hits[big])
    for path, size in ((small, 1024), (big, 64 * 1024)):
        hit = hits[path]
        assert hit.headers["content-length"] == str(size)
        ttl = re.fullmatch(r"relay; hit; ttl=(\d+)", hit.headers["cache-status"])
        assert ttl is not None
        assert int(ttl.group(1)) + int(hit.headers["age"]) in (3599, 3600)  # max-age=3600
        assert hashlib.sha256(hit.content).hexdigest() == expected_sha256(size)
    after = _cache_metrics(relay)
    assert after["hits_total"] - before["hits_total"] == 2
    assert after["bytes_from_cache_total"] - before["bytes_from_cache_total"] == 65 * 1024
    etag = hits[small].headers["etag"]
    head = httpx.head(relay.url + small)
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["content-length"] == "1024"
    not_modified = _status(relay, small, headers={"if-none-match": etag})
    assert not_modified.status_code == 304
    assert not_modified.content == b""
    assert not_modified.headers["etag"] == etag
    assert "content-type" not in not_modified.headers
    part = _status(relay, small, headers={"range": "bytes=1000-"})
    assert part.status_code == 206
    assert part.headers["content-range"] == "bytes 1000-1023/1024"
    assert part.headers["content-length"] == "24"
    assert hashlib.sha256(part.content).hexdigest() == expected_sha256(1024, 1000, 1024)
    beyond = _status(relay, small, headers={"range": "bytes=1024-"})
    assert beyond.status_code == 416
    assert beyond.headers["content-range"] == "bytes */1024"
    assert len(_gets(origin, "/gen/1k")) == 1


@pytest.mark.parametrize("size", ["1k", "256k"])
def test_cache_hit_of_a_vanished_file_is_answered_as_a_miss(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path, size: str
) -> None:
    """A stored file removed under relay (by another worker's eviction or purge, or an outside
    hand) between the lookup and the open: nothing was sent yet, so the request is answered
    as the miss it now is (never a short or foreign body, never a 503), and stored again."""
    relay = cached()
    origin.reset_stats()
    path = f"/o/gen/{size}?v=41"
    assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    assert _status(relay, path).headers["cache-status"].startswith("relay; hit")
    (data,) = stored_data(tmp_path / "cache")
    data.unlink()
    gone = _status(relay, path)
    assert gone.status_code == 200
    assert gone.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(gone.content).hexdigest() == expected_sha256(len(gone.content))
    assert len(gone.content) == {"1k": 1024, "256k": 256 * 1024}[size]
    _settled(relay)
    again = _status(relay, path)
    assert again.headers["cache-status"].startswith("relay; hit")
    assert again.content == gone.content
    assert len(_gets(origin, f"/gen/{size}")) == 2


def test_cache_small_hit_after_a_purge_serves_the_new_version(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """What a small hit keeps from a stored response (its encoded head, its file's name)
    never outlives it: after a purge of a hot object, hits carry the new version's ETag."""
    relay = cached(admin_token="sesame")
    origin.reset_stats()
    path = "/o/gen/1k?v=42&etag_changes=1"  # a new ETag on every upstream fetch
    first = _status(relay, path)
    _settled(relay)
    for _ in range(3):
        hot = _status(relay, path)
        assert hot.headers["cache-status"].startswith("relay; hit")
        assert hot.headers["etag"] == first.headers["etag"]
    purged = httpx.delete(f"{relay.url}/cache{path}", headers={"x-relay-admin-token": "sesame"})
    assert purged.json() == {"purged": 1}
    second = _status(relay, path)
    assert second.headers["cache-status"] == "relay; fwd=miss"
    assert second.headers["etag"] != first.headers["etag"]
    _settled(relay)
    for _ in range(3):
        hot = _status(relay, path)
        assert hot.headers["cache-status"].startswith("relay; hit")
        assert hot.headers["etag"] == second.headers["etag"]
        assert hashlib.sha256(hot.content).hexdigest() == expected_sha256(1024)
    assert len(_gets(origin, "/gen/1k")) == 2


def test_cache_small_hits_to_clients_that_left_hold_nothing(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Clients that pipeline small hits and reset without reading: every stream slot is
    given back (small hits have no watcher task to notice them; the send is all they wait on),
    nothing is logged as unhandled, and the next client gets a whole hit."""
    relay = cached()
    path = "/o/gen/1k?v=43"
    assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    request = f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request * 50)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert wait_until(lambda: relay.streams_active() == 0)
    assert relay.logged_errors() == []
    hit = _status(relay, path)
    assert hit.headers["cache-status"].startswith("relay; hit")
    assert hashlib.sha256(hit.content).hexdigest() == expected_sha256(1024)


def test_cache_immutable_route_keeps_files_the_upstream_gave_no_lifetime(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """`immutable = true`: a file whose upstream says it may be reused for 0 s stays a hit (a
    year's freshness); `no-cache` from the upstream is still revalidated every time. The same
    answers on a route without the marker go back to the upstream."""
    routes = (
        Route(prefix="/o/", upstream=origin.url + "/", allow_private=True),
        Route(prefix="/files/", upstream=origin.url + "/", allow_private=True, immutable=True),
    )
    relay = cached(routes=routes)
    origin.reset_stats()
    for prefix in ("/o/", "/files/"):
        for _ in range(2):
            got = _status(relay, f"{prefix}gen/64k?v=31&cc=max-age=0")
            assert hashlib.sha256(got.content).hexdigest() == expected_sha256(64 * 1024)
            _settled(relay)
    assert (
        _status(relay, "/files/gen/64k?v=31&cc=max-age=0")
        .headers["cache-status"]
        .startswith("relay; hit; ttl=3153")
    )
    # /o/: stored, then revalidated; /files/: stored once, then hits.
    assert len(_gets(origin, "/gen/64k")) == 3
    for _ in range(2):
        _status(relay, "/files/gen/64k?v=32&cc=no-cache")
        _settled(relay)
    assert len(_gets(origin, "/gen/64k")) == 5


def test_cache_small_hits_to_a_client_that_stopped_reading_give_their_slot_back(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A client that pipelines small hits and stops reading (its connection still open):
    the hit waiting for the socket to drain gives its stream slot back within send_timeout,
    as every other answer does, and the connection is reset."""
    relay = cached(send_timeout=0.5)
    path = "/o/gen/16k?v=44"
    assert _status(relay, path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    request = f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(request * 400)
        assert wait_until(lambda: relay.streams_active() == 1)
        assert wait_until(lambda: relay.streams_active() == 0), "a stalled small hit holds its slot"
    assert relay.logged_errors() == []
