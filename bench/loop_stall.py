"""``python -m bench.loop_stall``: how long relay's event loop stops serving while the cache
does disk work, and one large cold fill's throughput.

Two scenarios against ``tests.origin`` (its own process, on loopback), with relay served by
uvicorn in this process (a thread with its own loop) so that a probe can run on relay's loop:
the probe sleeps 1 ms at a time and records how late each wake-up is; the longest lateness is
the loop's longest stall (no client could be served meanwhile).

* refresh: an object stored as ``--slices`` slices of 64 KiB with ``max-age=1``, then (once
  stale) a Range of it: the 304 refreshes every slice's metadata. Reported: the loop's longest
  stall during the refresh and the Range's time.
* cold fill: one ``--fill`` object (default 1 GiB) through relay with the cache on, from an
  unpaced origin: time, throughput, this process's CPU time (relay and the client), the
  loop's longest stall meanwhile, and the sha256.

Every loop is bounded; the origin and relay are stopped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx

from bench.procs import free_port
from tests.harness import RelayThread, relay_config, wait_until
from tests.origin import expected_sha256, parse_size

KiB = 1024
MiB = 1024 * KiB
SLICE = 64 * KiB


class Probe:
    """Sleeps `interval` at a time on a loop; the longest lateness of a wake-up."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.longest = 0.0
        self._stop = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop:
            before = loop.time()
            await asyncio.sleep(self.interval)
            late = loop.time() - before - self.interval
            self.longest = max(self.longest, late)

    def stop(self) -> None:
        self._stop = True


def _probe(relay: RelayThread) -> tuple[Probe, Future[None]]:
    assert relay.loop is not None
    probe = Probe()
    return probe, asyncio.run_coroutine_threadsafe(probe.run(), relay.loop)


def _stop(probe: Probe, running: Future[None]) -> float:
    probe.stop()
    running.result(10)
    return probe.longest


def refresh(origin: str, tmp: Path, slices: int) -> dict[str, Any]:
    size = slices * SLICE
    config = relay_config(
        origin,
        cache_dir=str(tmp / "refresh"),
        cache_max_bytes=4 * size,
        cache_max_object_bytes=2 * size,
        cache_slice_bytes=SLICE,
    )
    path = f"/o/gen/{size}?v=7&cc=max-age%3D1"
    relay = RelayThread(config).start()
    try:
        with httpx.Client(base_url=relay.url, timeout=600) as client:
            client.get(path, headers={"range": "bytes=0-0"})
            whole = client.get(path)  # every slice, from slices
            assert whole.status_code == 200, whole.status_code
            assert hashlib.sha256(whole.content).hexdigest() == expected_sha256(size)
            time.sleep(1.5)  # stale (max-age=1)
            probe, running = _probe(relay)
            started = time.perf_counter()
            ranged = client.get(path, headers={"range": f"bytes={5 * SLICE}-{5 * SLICE + 99}"})
            took = time.perf_counter() - started
            assert ranged.status_code == 206, ranged.status_code
            assert "fwd-status=304" in ranged.headers["cache-status"], ranged.headers
            time.sleep(2.0)  # the refresh's disk work, wherever it runs
            stall = _stop(probe, running)
    finally:
        relay.stop()
    return {"slices": slices, "range_s": took, "longest_stall_s": stall}


def cold_fill(origin: str, tmp: Path, size: int) -> dict[str, Any]:
    config = relay_config(
        origin,
        cache_dir=str(tmp / "fill"),
        cache_max_bytes=2 * size,
        cache_max_object_bytes=size,
    )
    relay = RelayThread(config).start()
    digest = hashlib.sha256()
    try:
        probe, running = _probe(relay)
        started = time.perf_counter()
        cpu = time.process_time()
        with httpx.stream("GET", f"{relay.url}/o/gen/{size}?v=3", timeout=600) as response:
            assert response.status_code == 200, response.status_code
            for chunk in response.iter_raw(MiB):
                digest.update(chunk)
        took = time.perf_counter() - started
        cpu = time.process_time() - cpu
        stall = _stop(probe, running)
    finally:
        relay.stop()
    ok = digest.hexdigest() == expected_sha256(size)
    rate = size / MiB / took
    # cpu_s: this process's CPU time (relay and the client; the origin is another process),
    # steadier than the wall time on a loaded machine.
    return {
        "bytes": size,
        "s": took,
        "MiB/s": rate,
        "cpu_s": cpu,
        "longest_stall_s": stall,
        "ok": ok,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loop_stall")
    parser.add_argument("--slices", type=int, default=2048)
    parser.add_argument("--fill", default="1g", help="size of the cold fill (0: skip)")
    args = parser.parse_args(argv)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.origin", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    origin = f"http://127.0.0.1:{port}"
    try:
        assert wait_until(lambda: _up(origin), timeout=20), "origin did not start"
        with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
            if args.slices:
                print("refresh:", refresh(origin, Path(tmp), args.slices), flush=True)
            size = parse_size(args.fill)
            if size:
                print("cold fill:", cold_fill(origin, Path(tmp), size), flush=True)
    finally:
        proc.terminate()
        proc.wait(10)
    return 0


def _up(origin: str) -> bool:
    try:
        return httpx.get(origin + "/gen/1", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
