"""The cache across a real restart: relay as its own process (`python -m relay serve`), killed
with SIGKILL mid-fill, and a new process started on the same cache_dir."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.e2e.caching import meta_files, partial_files
from tests.e2e.test_process import RelayProcess
from tests.harness import wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def _objects(root: Path) -> list[str]:
    """The objects with files under cache_dir (the key digests their file names start with)."""
    return sorted({p.name.split(".")[0] for p in (root / "objects").rglob("*") if p.is_file()})


def _meta_of(root: Path, url_part: str, *, slice_: bool = False) -> list[Path]:
    found = []
    for meta in meta_files(root):
        data = json.loads(meta.read_bytes())
        if url_part in data["url"] and ("total" in data["extra"]) == slice_:
            found.append(meta)
    return found


def test_cache_sigkill_mid_fill_then_restart(origin: Origin, tmp_path: Path) -> None:
    """SIGKILL while a whole fill (8 MiB, rate-limited) and a slice fill (a Range of a 64 MiB
    object) are running, with an object caught between its data and its record, and beside a
    completed object the leftovers of earlier versions and fills (partial files of two fills,
    an old version's data file without its record, an old version complete but superseded):
    the next process removes every partial file, incomplete object and old version at
    startup, serves nothing incomplete (a whole GET and a Range are exact misses, fetched
    again), and still hits the newest version of the objects completed before the kill."""
    root = tmp_path / "cache"
    settings = {
        "cache_dir": str(root),
        "cache_max_bytes": 512 * MiB,
        "cache_slice_bytes": 1 * MiB,
        "drain_timeout": 1,
        "shutdown_delay": 0,
    }
    first = RelayProcess(origin, tmp_path, **settings).start()
    done, window = "/o/gen/1m?v=91", "/o/gen/256k?v=92"
    whole = f"/o/gen/8m?v=93&slow={8 * MiB}"
    ranged = f"/o/gen/64m?v=94&slow={2 * MiB}"
    try:
        for path in (done, window):
            response = httpx.get(first.url + path, timeout=30)
            assert response.headers["cache-status"] == "relay; fwd=miss"
        threads = [
            threading.Thread(target=_read_until_killed, args=(first.url + whole, {})),
            threading.Thread(
                target=_read_until_killed,
                args=(first.url + ranged, {"range": f"bytes={10 * MiB}-{11 * MiB - 1}"}),
            ),
        ]
        for t in threads:
            t.start()
        # Both fills are under way: their partial files hold some bytes, not all.
        assert wait_until(_two_fills_under_way(root), timeout=20)
        assert first.proc is not None
        first.proc.kill()  # SIGKILL: no lifespan, no cleanup
        first.proc.wait(10)
        for t in threads:
            t.join(30)
    finally:
        first.stop()
    assert len(_partials(root)) == 2  # what the killed process left
    # The window between publishing a version's data and writing its record. A kill cannot
    # be timed into it, so the state is made by hand on a completed object.
    (meta,) = _meta_of(root, "/gen/256k")
    meta.unlink()
    # Beside a completed object, what earlier fills and versions can leave: the partial files
    # of two fills killed mid-way, the data file of an old version whose record was removed
    # first, and a whole old version (its record says it was stored earlier) not yet removed.
    (done_meta,) = _meta_of(root, "/gen/1m")
    digest = done_meta.name.split(".")[0]
    bucket = done_meta.parent
    for token in ("a" * 16, "b" * 16):
        (bucket / f"{digest}.{token}.partial").write_bytes(b"x" * 1000)
    (bucket / f"{digest}.{'c' * 16}.data").write_bytes(b"o" * MiB)
    old = json.loads(done_meta.read_bytes())
    old["stored_at"] -= 100
    old["data"] = f"{digest}.{'d' * 16}.data"
    (bucket / old["data"]).write_bytes(b"o" * MiB)
    (bucket / f"{digest}.{'d' * 16}.meta").write_text(json.dumps(old))
    assert len([p for p in bucket.iterdir() if p.name.startswith(digest + ".")]) == 7
    newest = [done_meta.name, done_meta.with_suffix(".data").name]
    assert len(_objects(root)) == 4  # done, window, and the two killed fills

    # The origin notices the killed process's connections are gone before counting anew.
    assert origin.wait_for(lambda o: o.open_connections == 0, timeout=20)
    origin.reset_stats()
    second = RelayProcess(origin, tmp_path, **settings).start()
    try:
        # At startup: partial files, incomplete objects and old versions are gone; the
        # completed object's newest version stays.
        assert _partials(root) == []
        assert _objects(root) == [digest]
        assert sorted(p.name for p in bucket.iterdir()) == sorted(newest)

        hit = httpx.get(second.url + done, timeout=30)
        assert hit.headers["cache-status"].startswith("relay; hit")
        assert hashlib.sha256(hit.content).hexdigest() == expected_sha256(MiB)
        assert origin.body_bytes == 0

        again = httpx.get(second.url + window, timeout=30)
        assert again.headers["cache-status"] == "relay; fwd=miss"
        assert hashlib.sha256(again.content).hexdigest() == expected_sha256(256 * 1024)

        cut = httpx.get(second.url + whole, timeout=60)
        assert cut.headers["cache-status"] == "relay; fwd=miss"
        assert hashlib.sha256(cut.content).hexdigest() == expected_sha256(8 * MiB)
        part = httpx.get(second.url + whole, headers={"range": "bytes=5000000-5999999"})
        assert part.status_code == 206
        assert part.headers["cache-status"].startswith("relay; hit")
        assert hashlib.sha256(part.content).hexdigest() == expected_sha256(
            8 * MiB, 5000000, 6000000
        )

        sliced = httpx.get(
            second.url + ranged,
            headers={"range": f"bytes={10 * MiB + 5}-{10 * MiB + 99}"},
            timeout=60,
        )
        assert sliced.status_code == 206
        assert sliced.headers["cache-status"] == "relay; fwd=miss"
        assert hashlib.sha256(sliced.content).hexdigest() == expected_sha256(
            64 * MiB, 10 * MiB + 5, 10 * MiB + 100
        )
        # Asked again from the origin: the 256k object, the 8 MiB object, the 64 MiB slice.
        assert origin.body_bytes == 256 * 1024 + 8 * MiB + MiB
        assert _partials(root) == []
    finally:
        second.stop()


def _partials(root: Path) -> list[Path]:
    return partial_files(root)


def _two_fills_under_way(root: Path) -> Callable[[], bool]:
    def check() -> bool:
        partials = _partials(root)
        return len(partials) == 2 and all(p.stat().st_size > 0 for p in partials)

    return check


def _read_until_killed(url: str, headers: dict[str, str]) -> None:
    try:
        with httpx.stream("GET", url, headers=headers, timeout=30) as response:
            for _ in response.iter_raw():
                pass
    except httpx.HTTPError:
        pass  # the relay was killed under it
