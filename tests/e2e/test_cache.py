"""The read-through cache end to end: a real relay under uvicorn in front of the test origin,
counting the origin's requests and body bytes."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import RelayThread, wait_until
from tests.origin import Origin, expected_sha256

MiB = 1024 * 1024

MakeRelay = Callable[..., RelayThread]


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    def start(**overrides: Any) -> RelayThread:
        settings: dict[str, Any] = {
            "cache_dir": str(tmp_path / "cache"),
            "cache_max_bytes": 512 * MiB,
            "cache_slice_bytes": 1 * MiB,
        }
        settings.update(overrides)
        return make_relay(**settings)

    return start


def _gets(origin: Origin, path: str) -> list[str]:
    return [r.target for r in origin.requests if r.path == path and r.method == "GET"]


def _settled(relay: RelayThread) -> None:
    assert relay.settled(), "relay did not settle"


def test_cache_miss_is_stored_then_hit_from_disk(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """The first GET is fetched once and stored; the second is answered from disk."""
    relay = cached()
    origin.reset_stats()
    url = f"{relay.url}/o/gen/1m?v=11"
    first = httpx.get(url)
    assert first.status_code == 200
    assert first.headers["cache-status"] == "relay; fwd=miss; stored"
    assert hashlib.sha256(first.content).hexdigest() == expected_sha256(MiB)
    assert wait_until(lambda: any((tmp_path / "cache" / "objects").rglob("data")))
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
