"""The cache's files end to end: each stored version in its own files (a revalidation never
splices versions), fills that never touch each other's partial files, malformed metadata
discarded at startup, and a budget that counts what the cache occupies on disk."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import pytest

from relay.cache.clock import ManualClock
from tests.e2e.caching import MiB
from tests.harness import RelayThread, relay_config
from tests.origin import Origin, expected_sha256

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
