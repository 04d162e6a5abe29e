"""Stored bytes against the digests relay knows (issue 21, item 4): a byte flipped on disk in an
object whose sha256 relay knows (a `Repr-Digest` object, a Hub LFS file, a sliced object) is
never served after a restart, whatever the request (whole, range, HEAD then GET); the object is
dropped, counted and fetched again. A scrub finds it without a restart."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.caching import MakeRelay, cache_metrics, caching_relay, data_files, settled
from tests.e2e.caching import hub_relay as _cached_relay
from tests.ecosystems import Hub
from tests.harness import RelayThread, wait_until
from tests.origin import Origin, body_bytes, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
OBJECT = "/o/gen/1m?v=41&repr_digest=good"
ADMIN = {"x-relay-admin-token": "sesame"}


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> MakeRelay:
    # The startup verification is off unless a test turns it on: what is tested is the answer.
    return caching_relay(make_relay, tmp_path, cache_verify_on_start=False, admin_token="sesame")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _stored_then_flipped(cached: MakeRelay, tmp_path: Path, path: str = OBJECT) -> None:
    """Store `path` (1 MiB), stop relay, flip one byte of its data file."""
    first = cached()
    response = httpx.get(first.url + path)
    assert response.headers["cache-status"] == "relay; fwd=miss"
    settled(first)
    first.stop()
    (data,) = data_files(tmp_path / "cache")
    _flip(data, 500_000)


def _mismatches(relay: RelayThread) -> float:
    return cache_metrics(relay)["digest_mismatches_total"]


def test_flipped_byte_whole_get_after_restart_aborts_then_refetches(
    cached: MakeRelay, tmp_path: Path, origin: Origin
) -> None:
    """A whole GET hashes as it sends: the transfer is cut before its last chunk (never a clean
    body of wrong bytes), the object dropped and counted; the next GET is a miss with the
    right bytes."""
    _stored_then_flipped(cached, tmp_path)
    relay = cached()
    with pytest.raises(httpx.TransportError):  # reset before the last chunk
        httpx.get(relay.url + OBJECT)
    assert _mismatches(relay) == 1
    again = httpx.get(relay.url + OBJECT)
    assert again.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(MiB)
    hit = httpx.get(relay.url + OBJECT)
    assert hit.headers["cache-status"].startswith("relay; hit")
    assert hit.content == again.content
    settled(relay)


def test_flipped_byte_range_after_restart_is_a_miss_with_the_right_bytes(
    cached: MakeRelay, tmp_path: Path
) -> None:
    """A Range of an unverified object waits for its check: the flipped byte is found before
    anything is answered, and the range is answered as a miss, from the upstream."""
    _stored_then_flipped(cached, tmp_path)
    relay = cached()
    ranged = httpx.get(relay.url + OBJECT, headers={"range": "bytes=499990-500009"})
    assert ranged.status_code == 206
    assert "hit" not in ranged.headers["cache-status"]
    assert ranged.content == body_bytes(MiB, 499990, 500010)
    assert _mismatches(relay) == 1
    settled(relay)


def test_flipped_byte_head_then_get_after_restart(cached: MakeRelay, tmp_path: Path) -> None:
    """A HEAD waits for the check too (it is no hit of a corrupt object); the GET after it is a
    miss with the right bytes, never an aborted transfer."""
    _stored_then_flipped(cached, tmp_path)
    relay = cached()
    head = httpx.head(relay.url + OBJECT)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(MiB)
    assert "hit" not in head.headers.get("cache-status", "")
    assert _mismatches(relay) == 1
    get = httpx.get(relay.url + OBJECT)
    assert get.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(get.content).hexdigest() == expected_sha256(MiB)
    settled(relay)


def test_intact_object_after_restart_is_verified_once_then_hits(
    cached: MakeRelay, tmp_path: Path, origin: Origin
) -> None:
    """Unflipped: a range waits for the check and hits; the whole GET then hits (zero-copy
    again: verified), nothing is fetched again, nothing counted."""
    first = cached()
    httpx.get(first.url + OBJECT)
    settled(first)
    first.stop()
    origin.reset_stats()
    relay = cached()
    ranged = httpx.get(relay.url + OBJECT, headers={"range": "bytes=10-19"})
    assert ranged.headers["cache-status"].startswith("relay; hit")
    assert ranged.content == body_bytes(MiB, 10, 20)
    whole = httpx.get(relay.url + OBJECT)
    assert whole.headers["cache-status"].startswith("relay; hit")
    assert hashlib.sha256(whole.content).hexdigest() == expected_sha256(MiB)
    assert origin.body_bytes == 0
    metrics = cache_metrics(relay)
    assert metrics["digest_mismatches_total"] == 0
    assert metrics["bytes_zero_copy_total"] == MiB  # the second whole answer, once verified
    settled(relay)


def test_flipped_byte_found_by_the_startup_verification(cached: MakeRelay, tmp_path: Path) -> None:
    """With the startup verification on, the flipped object is dropped in the background: the
    GET after it is a plain miss."""
    _stored_then_flipped(cached, tmp_path)
    relay = cached(cache_verify_on_start=True)
    assert wait_until(lambda: _mismatches(relay) == 1)
    assert wait_until(lambda: cache_metrics(relay)["scrub_running"] == 0)
    metrics = cache_metrics(relay)
    assert (metrics["scrub_objects_checked_total"], metrics["scrub_mismatches_total"]) == (1, 1)
    assert metrics["scrub_bytes_hashed_total"] == MiB
    get = httpx.get(relay.url + OBJECT)
    assert get.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(get.content).hexdigest() == expected_sha256(MiB)
    settled(relay)


def test_flipped_slice_after_restart(cached: MakeRelay, tmp_path: Path) -> None:
    """A sliced object whose whole-object digest was checked (Repr-Digest, every slice
    stored): a byte flipped in one slice after a restart; a range of another slice waits for
    the object's check, which drops every slice; the range is a miss with the right bytes."""
    path = "/o/gen/3m?v=43&repr_digest=good"
    first = cached()
    httpx.get(first.url + path, headers={"range": "bytes=0-0"})
    whole = httpx.get(first.url + path)  # from slices: all three stored and checked
    assert hashlib.sha256(whole.content).hexdigest() == expected_sha256(3 * MiB)
    settled(first)
    first.stop()
    datas = data_files(tmp_path / "cache")
    assert len(datas) == 3
    _flip(datas[0], 1000)
    relay = cached()
    ranged = httpx.get(relay.url + path, headers={"range": f"bytes={2 * MiB}-{2 * MiB + 9}"})
    assert ranged.status_code == 206
    assert "hit" not in ranged.headers["cache-status"]
    assert ranged.content == body_bytes(3 * MiB, 2 * MiB, 2 * MiB + 10)
    assert _mismatches(relay) == 1
    again = httpx.get(relay.url + path)
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(3 * MiB)
    settled(relay)


def test_scrub_finds_a_flipped_byte_without_a_restart(cached: MakeRelay, tmp_path: Path) -> None:
    """POST /cache/scrub (admin) checks every object with a known digest while relay serves;
    GET /cache/scrub shows the run; the flipped object is dropped and counted, the intact one
    kept; the next GET of the flipped one is a miss with the right bytes."""
    other = "/o/gen/256k?v=44&repr_digest=good"
    plain = "/o/gen/64k?v=45"  # no digest: not checked
    relay = cached()
    for path in (OBJECT, other, plain):
        httpx.get(relay.url + path)
    settled(relay)
    assert httpx.post(relay.url + "/cache/scrub").status_code == 401
    assert httpx.get(relay.url + "/cache/scrub", headers=ADMIN).json() == {"state": "never"}
    (flipped,) = [p for p in data_files(tmp_path / "cache") if p.stat().st_size == MiB]
    _flip(flipped, 123_456)
    started = httpx.post(relay.url + "/cache/scrub", headers=ADMIN)
    assert started.status_code == 202
    assert started.json()["objects"] == 2

    def done() -> bool:
        return bool(httpx.get(relay.url + "/cache/scrub", headers=ADMIN).json()["state"] == "done")

    assert wait_until(done)
    result = httpx.get(relay.url + "/cache/scrub", headers=ADMIN).json()
    assert result == {
        "state": "done",
        "reason": "admin",
        "objects": 2,
        "checked": 2,
        "bytes_hashed": MiB + 256 * 1024,
        "mismatches": 1,
        "running": False,
    }
    assert _mismatches(relay) == 1
    kept = httpx.get(relay.url + other)
    assert kept.headers["cache-status"].startswith("relay; hit")
    get = httpx.get(relay.url + OBJECT)
    assert get.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(get.content).hexdigest() == expected_sha256(MiB)
    settled(relay)


def test_a_second_scrub_while_one_runs_reports_it(cached: MakeRelay) -> None:
    """A scrub paced at 1 byte/s is still running: a second POST is a 409 with its progress."""
    relay = cached(cache_verify_rate=1)
    httpx.get(relay.url + OBJECT)
    settled(relay)
    assert httpx.post(relay.url + "/cache/scrub", headers=ADMIN).status_code == 202
    second = httpx.post(relay.url + "/cache/scrub", headers=ADMIN)
    assert second.status_code == 409
    assert second.json()["state"] == "running"
    assert second.json()["objects"] == 1
    assert cache_metrics(relay)["scrub_running"] == 1


# ---- the Hub's LFS files --------------------------------------------------------------------


@pytest.fixture
def hub() -> Iterator[Hub]:
    site = Hub()
    with site.hub, site.cdn:
        yield site


HUB_FILE = f"/hf/{Hub.repo}/resolve/main/model.bin"


def _hub_relay(hub: Hub, tmp_path: Path) -> Callable[[], Any]:
    return lambda: _cached_relay(hub, tmp_path, settings={"cache_verify_on_start": False})


def _hub_file_flipped(hub: Hub, tmp_path: Path, offset: int) -> Callable[[], Any]:
    """model.bin stored by one relay, a byte of it flipped on disk; starts the next relay."""
    relay_of = _hub_relay(hub, tmp_path)
    with relay_of() as relay:
        assert httpx.get(relay.url + HUB_FILE).content == hub.lfs["model.bin"]
        settled(relay)
    (stored,) = data_files(tmp_path / "cache")
    _flip(stored, offset)
    return relay_of


def test_hub_lfs_file_flipped_after_restart(hub: Hub, tmp_path: Path) -> None:
    """A Hub LFS file (content-addressed: its sha256 is its key) with a byte flipped on disk:
    after a restart, a range is a miss with the right bytes, and the whole file is fetched
    again from the CDN, exact."""
    data = hub.lfs["model.bin"]
    url = HUB_FILE
    relay_of = _hub_file_flipped(hub, tmp_path, 7)
    cdn_gets = [m for m, _, _ in hub.cdn.requests].count("GET")
    with relay_of() as relay:
        ranged = httpx.get(relay.url + url, headers={"range": "bytes=0-99"})
        assert ranged.status_code == 206
        assert ranged.content == data[:100]
        assert "hit" not in ranged.headers["cache-status"]
        assert cache_metrics(relay)["digest_mismatches_total"] == 1
        whole = httpx.get(relay.url + url)
        assert whole.content == data
        assert httpx.get(relay.url + url).headers["cache-status"].startswith("relay; hit")
        settled(relay)
    assert [m for m, _, _ in hub.cdn.requests].count("GET") > cdn_gets


def test_hub_lfs_file_flipped_after_restart_head_then_get(hub: Hub, tmp_path: Path) -> None:
    """huggingface_hub's way: a HEAD, then the GET. The HEAD finds the flipped byte (its
    check drops the object) and says nothing from it; the GET is a miss with the exact
    bytes, never an aborted transfer."""
    data = hub.lfs["model.bin"]
    url = HUB_FILE
    relay_of = _hub_file_flipped(hub, tmp_path, len(data) - 1)
    with relay_of() as relay:
        head = httpx.head(relay.url + url)
        assert head.status_code == 200
        assert "hit" not in head.headers.get("cache-status", "")
        assert cache_metrics(relay)["digest_mismatches_total"] == 1
        get = httpx.get(relay.url + url)
        assert get.headers["cache-status"] == "relay; fwd=miss"
        assert get.content == data
        settled(relay)
