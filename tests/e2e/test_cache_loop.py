"""The cache's disk and hashing work stays off the event loop (issue 21, item 21): a 304 that
refreshes every slice of an object writes their metadata on the cache's own threads (it took
1.6 s of the loop for a 10 GiB object), and so do a fill's chunk writes, its publish and the
removals of a purge. No wall-clock threshold: the thread each piece of work ran on is
recorded (`python -m bench.loop_stall` measures the loop's longest stall)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.cache.executor import THREAD_PREFIX
from tests.e2e.caching import MakeRelay, caching_relay, data_files, settled
from tests.harness import wait_until
from tests.origin import body_bytes

pytestmark = pytest.mark.e2e

KiB = 1024
SLICES = 24


class Threads:
    """The threads a function of `os` ran on, for the paths it was given (one relay)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, matches: Callable[..., bool]):
        self.seen: list[str] = []
        real = getattr(os, name)
        lock = threading.Lock()

        def recording(*args: Any, **kwargs: Any) -> Any:
            if matches(*args):
                with lock:
                    self.seen.append(threading.current_thread().name)
            return real(*args, **kwargs)

        monkeypatch.setattr(os, name, recording)

    def off_the_loop(self) -> bool:
        return bool(self.seen) and all(n.startswith(THREAD_PREFIX) for n in self.seen)


def _is_meta(src: Any, dst: Any = "", *_: Any) -> bool:
    return str(dst).endswith(".meta")


def test_a_304_refreshes_every_slice_on_the_cache_threads(
    make_relay: MakeRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An object stored as 24 slices with max-age=0: a Range of it is revalidated, the 304
    refreshes all 24 slices' metadata, each rename made on the cache's threads; a fill's
    writes (pwrite) too; the refreshed slices are then answered without another request."""
    relay = caching_relay(make_relay, tmp_path, cache_slice_bytes=64 * KiB)()
    size = SLICES * 64 * KiB
    path = f"/o/gen/{size}?v=51&cc=max-age%3D0"
    writes = Threads(monkeypatch, "pwrite", lambda *a: True)
    httpx.get(relay.url + path, headers={"range": "bytes=0-0"})
    whole = httpx.get(relay.url + path)  # every slice stored
    assert whole.content == body_bytes(size)
    settled(relay)
    assert len(data_files(tmp_path / "cache")) == SLICES
    assert writes.off_the_loop(), writes.seen
    renames = Threads(monkeypatch, "replace", _is_meta)
    ranged = httpx.get(relay.url + path, headers={"range": "bytes=70000-70009"})
    assert ranged.status_code == 206
    assert "fwd-status=304" in ranged.headers["cache-status"]
    assert ranged.content == body_bytes(size, 70000, 70010)
    assert wait_until(lambda: len(renames.seen) >= SLICES)
    assert renames.off_the_loop(), renames.seen
    settled(relay)


def test_a_purge_removes_files_on_the_cache_threads(
    make_relay: MakeRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge of a prefix unlinks every object's files on the cache's threads, in one job;
    all are gone once it ran, and the objects are fetched again."""
    relay = caching_relay(make_relay, tmp_path, admin_token="sesame")()
    paths = [f"/o/gen/4k?v={60 + i}" for i in range(5)]
    for path in paths:
        httpx.get(relay.url + path)
    settled(relay)
    unlinks = Threads(monkeypatch, "unlink", lambda *a: "objects" in str(a[0]))
    purged = httpx.post(
        relay.url + "/cache/purge",
        json={"prefix": "/o/gen/"},
        headers={"x-relay-admin-token": "sesame"},
    )
    assert purged.json() == {"purged": 5}
    assert wait_until(lambda: data_files(tmp_path / "cache") == [])
    assert unlinks.off_the_loop(), unlinks.seen
    again = httpx.get(relay.url + paths[0])
    assert again.headers["cache-status"] == "relay; fwd=miss"
    settled(relay)


def test_a_fill_makes_its_directory_and_opens_its_file_on_the_cache_threads(
    make_relay: MakeRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A miss's fill creates its bucket directory and opens its partial file (to write, and
    for its readers) on the cache's threads, like its writes."""
    relay = caching_relay(make_relay, tmp_path)()
    mkdirs = Threads(monkeypatch, "mkdir", lambda *a: "objects" in str(a[0]))
    opens = Threads(monkeypatch, "open", lambda *a: str(a[0]).endswith(".partial"))
    path = "/o/gen/4k?v=70"
    response = httpx.get(relay.url + path)
    assert response.content == body_bytes(4 * KiB)
    settled(relay)
    assert opens.off_the_loop(), opens.seen
    assert mkdirs.off_the_loop(), mkdirs.seen
