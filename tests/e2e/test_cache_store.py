"""The cache's files end to end: each stored version in its own files (a revalidation never
splices versions), fills that never touch each other's partial files, malformed metadata
discarded at startup, and a budget that counts what the cache occupies on disk."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import httpx
import pytest

from relay.cache.clock import ManualClock
from tests.cache.records import DAMAGES
from tests.e2e.caching import MakeRelay, MiB, cache_metrics, disk_use, meta_files
from tests.harness import RelayThread, relay_config
from tests.origin import Origin, body_bytes, expected_sha256

pytestmark = pytest.mark.e2e


def _versioned(size: int, version: int) -> str:
    """The sha256 of version `version` of a `vkey` object of `size` bytes."""
    return expected_sha256(size + version, version, size + version)


def test_cache_revalidation_never_splices_versions(origin: Origin, tmp_path: Path) -> None:
    """Issue 21 item 1, as reported: a small object with max-age=1 and
    stale-while-revalidate, its version bumped upstream, then 25 back-to-back GETs. Every
    answer is one version whole: the bytes of the version its ETag names, with that
    version's Content-Length (the stale answers version 0's, the later ones version 1's)."""
    clock = ManualClock(now=time.time())
    config = relay_config(origin.url, cache_dir=str(tmp_path / "cache"), cache_max_bytes=64 * MiB)
    relay = RelayThread(config, clock=clock).start()
    try:
        size = 4096
        origin.set_version("splice", 0)
        path = f"/o/gen/{size}?vkey=splice&cc=max-age%3D1%2Cstale-while-revalidate%3D60"
        with httpx.Client(base_url=relay.url, timeout=30) as client:
            first = client.get(path)
            assert first.headers["cache-status"] == "relay; fwd=miss; stored"
            assert hashlib.sha256(first.content).hexdigest() == _versioned(size, 0)
            assert relay.settled()
            origin.set_version("splice", 1)
            clock.advance(2)  # past max-age=1: stale, within stale-while-revalidate
            etags: list[str] = []
            for _ in range(25):
                response = client.get(path)
                assert response.status_code == 200
                etag = response.headers["etag"]
                version = {'"gen-4096-v0"': 0, '"gen-4096-v1"': 1}[etag]
                assert response.headers["content-length"] == str(size)
                assert hashlib.sha256(response.content).hexdigest() == _versioned(size, version), (
                    f"answer {len(etags)}: {etag} with another version's bytes"
                )
                etags.append(etag)
        assert etags[0] == '"gen-4096-v0"'
        assert relay.settled()
    finally:
        relay.stop()


def test_cache_disk_use_stays_within_the_budget(
    origin: Origin, make_relay: MakeRelay, tmp_path: Path
) -> None:
    """Issue 21 item 14 (disk; reported as 1,000 unique 16-byte objects taking 12 MiB against
    a 4 MiB budget): 500 unique 16-byte objects against a 2 MiB budget. What the cache takes
    on disk (st_blocks of every file and directory under cache_dir: data, records,
    directories) stays within cache_max_bytes; no directory is left empty, none is made per
    object; relay_cache_size_bytes is that disk use; the latest objects are still hits."""
    root = tmp_path / "cache"
    budget = 2 * MiB
    relay = make_relay(cache_dir=str(root), cache_max_bytes=budget)
    with httpx.Client(base_url=relay.url, timeout=30) as client:
        for i in range(500):
            response = client.get(f"/o/gen/16?v={i}")
            assert response.headers["cache-status"] == "relay; fwd=miss; stored"
        assert relay.settled()
        used, directories = disk_use(root)
        metrics = cache_metrics(relay)
        assert used <= budget
        assert metrics["size_bytes"] == used
        assert metrics["evictions_total"] > 0
        # cache_dir, objects/ and at most the 256 buckets, none of them empty.
        assert len(directories) <= 2 + 256
        assert [d for d in directories if not any(d.iterdir())] == []
        assert len(meta_files(root)) == metrics["objects"] > 100
        hit = client.get("/o/gen/16?v=499")
        assert hit.headers["cache-status"].startswith("relay; hit")
        assert hit.content == body_bytes(16)


def _record_of(root: Path, url_part: str) -> Path:
    """The metadata file of the stored object whose URL ends with `url_part` (found by its
    content, whatever the layout)."""
    for path in (root / "objects").rglob("*"):
        try:
            record = json.loads(path.read_bytes())
        except (ValueError, OSError):
            continue
        if isinstance(record, dict) and str(record.get("url")).endswith(url_part):
            return path
    raise AssertionError(f"no record of {url_part}")


@pytest.mark.parametrize("damage", ["key-type", "stored-at-type"])
def test_cache_malformed_metadata_is_discarded_at_startup(
    origin: Origin,
    make_relay: MakeRelay,
    tmp_path: Path,
    damage: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 21 item 4's metadata, as reported: `"key": 123` crashed startup with a
    traceback, `"stored_at": "yesterday"` made every request for that object a 500. Relay
    starts, one warning line names the record, that object is fetched again (a miss), the
    others are hits."""
    root = tmp_path / "cache"
    good, bad = "/o/gen/64k?v=701", "/o/gen/65536?v=702"
    first = make_relay(cache_dir=str(root), cache_max_bytes=64 * MiB)
    for path in (good, bad):
        assert httpx.get(first.url + path).headers["cache-status"] == "relay; fwd=miss; stored"
    assert first.settled()
    first.stop()
    record = _record_of(root, "/gen/65536")
    record.write_bytes(DAMAGES[damage](record.read_bytes()))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        second = make_relay(cache_dir=str(root), cache_max_bytes=64 * MiB)
        hit = httpx.get(second.url + good)
        again = httpx.get(second.url + bad)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("relay.cache")]
    assert len(warnings) == 1, warnings
    assert record.name in warnings[0]
    assert hit.headers["cache-status"].startswith("relay; hit")
    assert again.status_code == 200
    assert again.headers["cache-status"] == "relay; fwd=miss; stored"
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(64 * 1024)
