"""The cache's files end to end: each stored version in its own files (a revalidation never
splices versions), fills that never touch each other's partial files, malformed metadata
discarded at startup, and a budget that counts what the cache occupies on disk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from relay.cache.clock import ManualClock
from relay.net.transports import make_transport
from tests.cache.records import DAMAGES
from tests.e2e.caching import MakeRelay, MiB, cache_metrics, disk_use, meta_files
from tests.harness import RelayThread, curl, relay_config, wait_until
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
            assert first.headers["cache-status"] == "relay; fwd=miss"
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
            assert response.headers["cache-status"] == "relay; fwd=miss"
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
        assert httpx.get(first.url + path).headers["cache-status"] == "relay; fwd=miss"
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
    assert again.headers["cache-status"] == "relay; fwd=miss"
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(64 * 1024)


class _HeldClose(httpx.AsyncByteStream):
    """An upstream body whose close waits for `release` (an event on relay's loop); `closing`
    tells the close began."""

    def __init__(self, inner: httpx.AsyncByteStream) -> None:
        self._inner = inner
        self.closing = asyncio.Event()
        self.release = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            yield chunk

    async def aclose(self) -> None:
        self.closing.set()
        await self.release.wait()
        await self._inner.aclose()


def _hold_first_close(transport: httpx.AsyncBaseTransport, held: list[_HeldClose]) -> None:
    """The transport's first response gets a `_HeldClose` body (appended to `held`): a hook
    in relay's upstream transport, its pool and counters untouched."""
    send = transport.handle_async_request

    async def handle(request: httpx.Request) -> httpx.Response:
        response = await send(request)
        if not held:
            assert isinstance(response.stream, httpx.AsyncByteStream)
            held.append(_HeldClose(response.stream))
            response.stream = held[0]
        return response

    setattr(transport, "handle_async_request", handle)  # noqa: B010 - an instance's hook


def test_cache_a_failed_fill_releases_its_files_before_a_successor_starts(
    origin: Origin, tmp_path: Path
) -> None:
    """Issue 21 item 2 over HTTP: a fill cut by the upstream is held while it closes its
    response (a hook in the transport). A client asking meanwhile is relayed whole, not
    attached to a successor fill whose partial file the failed fill then deletes (its
    client's transfer was aborted at the publish); the next request fills and stores."""
    config = relay_config(
        origin.url, cache_dir=str(tmp_path / "cache"), cache_max_bytes=64 * MiB, resume_attempts=0
    )
    transport = make_transport(config)
    held: list[_HeldClose] = []
    _hold_first_close(transport, held)
    relay = RelayThread(config, transport=transport).start()
    try:
        path = f"/o/gen/1m?v=803&drop_once=300000&slow={2 * MiB}"
        first: list[int] = []
        cut = threading.Thread(target=lambda: first.append(curl(relay.url + path)[0]))
        cut.start()
        assert wait_until(lambda: bool(held) and relay.call(held[0].closing.is_set))
        with httpx.stream("GET", relay.url + path, timeout=30) as meanwhile:
            chunks = meanwhile.iter_raw()
            digest = hashlib.sha256(next(chunks))
            relay.call(held[0].release.set)  # the failed fill removes its partial file now
            for chunk in chunks:
                digest.update(chunk)
        assert meanwhile.status_code == 200
        assert digest.hexdigest() == expected_sha256(MiB)
        cut.join(30)
        assert first[0] in (18, 56)  # the cut fill's client: aborted, never a clean short body
        stored = httpx.get(relay.url + path, timeout=30)
        assert stored.headers["cache-status"] == "relay; fwd=miss"
        assert hashlib.sha256(stored.content).hexdigest() == expected_sha256(MiB)
        assert relay.settled()
        hit = httpx.get(relay.url + path, timeout=30)
        assert hit.headers["cache-status"].startswith("relay; hit")
    finally:
        relay.stop()
