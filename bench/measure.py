"""The six measurements, run against one target (direct, nginx proxy, relay, baseline)."""

from __future__ import annotations

import contextlib
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench import procfs
from bench.clients import (
    ClientError,
    CurlResult,
    LoadResult,
    TtfbResult,
    curl_get,
    curl_ttfb,
    have,
    run_load,
)
from bench.procs import Server
from bench.servers import REPO

GIB = 1024**3


@dataclass
class Settings:
    big: str  # "1g" / "256m"
    big_bytes: int
    slow_file: str
    runs: int = 3
    load_conns: int = 64
    load_seconds: int = 10
    ttfb_n: int = 50
    slow_n: int = 100
    slow_rate: float = 2e6
    slow_hold: float = 10.0
    slow_rcvbuf: int = 64 * 1024


@dataclass
class SlowResult:
    n: int
    idle_kib: int
    peak_kib: int
    after_kib: int
    fds_idle: tuple[int, int]
    fds_after: tuple[int, int]
    client: dict[str, Any]

    @property
    def per_stream_kib(self) -> float:
        return (self.peak_kib - self.idle_kib) / self.n if self.n else 0.0


@dataclass
class Row:
    key: str
    label: str
    na: str = ""  # reason the whole row is n/a
    cmd: str = ""
    tput: list[CurlResult] = field(default_factory=list)
    cpu_per_gib: list[float] = field(default_factory=list)
    load: LoadResult | None = None
    load_cpu_pct: float | None = None
    ttfb: TtfbResult | None = None
    rss_idle_kib: int | None = None
    rss_peak_kib: int | None = None
    hwm_before_kib: int | None = None
    hwm_after_kib: int | None = None
    rss_samples: int = 0
    slow: SlowResult | None = None
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def gbps(self) -> float | None:
        return statistics.median(r.gbps for r in self.tput) if self.tput else None

    @property
    def cpu(self) -> float | None:
        return statistics.median(self.cpu_per_gib) if self.cpu_per_gib else None


def _step(row: Row, what: str, fn: Callable[[], None]) -> None:
    t0 = time.monotonic()
    print(f"  [{row.label}] {what} ...", end="", flush=True)
    try:
        fn()
        print(f" {time.monotonic() - t0:.1f}s", flush=True)
    except (ClientError, OSError, subprocess.SubprocessError, ValueError, RuntimeError) as e:
        msg = f"{what}: {type(e).__name__}: {e}"
        row.errors.append(msg)
        print(f" FAILED ({msg})", flush=True)


def measure(
    row: Row, base_url: str, path: Callable[[str], str], proxy: Server | None, s: Settings
) -> None:
    """Run every measurement for one target. ``proxy`` is None for the direct row."""
    t_row = time.monotonic()
    big_url = base_url + path(s.big)
    small_url = base_url + path("1k")
    if not have("curl"):
        row.errors.append("curl not installed: throughput / TTFB n/a")

    def warmup() -> None:
        for _ in range(3):
            curl_get(small_url, max_time=30)

    def single_stream_rss() -> None:
        assert proxy is not None
        pids = proxy.tree()
        row.rss_idle_kib = procfs.rss_kib(pids)
        row.hwm_before_kib = procfs.hwm_kib(pids)
        with procfs.RssSampler(pids, interval=0.010, max_seconds=600) as sampler:
            r = curl_get(big_url)
        if r.size != s.big_bytes:
            raise ClientError(f"got {r.size} bytes, want {s.big_bytes}")
        row.rss_peak_kib = max(sampler.peak_kib(), procfs.rss_kib(pids))
        row.hwm_after_kib = procfs.hwm_kib(pids)
        row.rss_samples = len(sampler.samples)

    def throughput() -> None:
        pids = proxy.tree() if proxy else []
        for _ in range(s.runs):
            c0 = procfs.cpu_seconds(pids)
            r = curl_get(big_url)
            c1 = procfs.cpu_seconds(pids)
            if r.size != s.big_bytes:
                raise ClientError(f"got {r.size} bytes, want {s.big_bytes}")
            row.tput.append(r)
            if proxy:
                row.cpu_per_gib.append((c1 - c0) / (r.size / GIB))

    def ttfb() -> None:
        row.ttfb = curl_ttfb(small_url, s.ttfb_n)

    def load() -> None:
        run_load(small_url, s.load_conns, 1)  # warm-up: connection pools, caches
        pids = proxy.tree() if proxy else []
        c0, t0 = procfs.cpu_seconds(pids), time.monotonic()
        row.load = run_load(small_url, s.load_conns, s.load_seconds)
        c1, t1 = procfs.cpu_seconds(pids), time.monotonic()
        if proxy:
            row.load_cpu_pct = 100 * (c1 - c0) / (t1 - t0)

    def slow() -> None:
        assert proxy is not None
        row.slow = slow_readers(base_url + path(s.slow_file), proxy, s)

    if have("curl"):
        _step(row, "warm-up", warmup)
        if proxy:
            _step(row, f"RSS during one {s.big} stream", single_stream_rss)
        _step(row, f"{s.big} throughput x{s.runs}", throughput)
        _step(row, f"TTFB x{s.ttfb_n}", ttfb)
    _step(row, f"req/s 1k c{s.load_conns} {s.load_seconds}s", load)
    if proxy:
        _step(row, f"{s.slow_n} slow readers", slow)
        if not proxy.alive():
            row.errors.append(f"proxy died: exit {proxy.proc.returncode}\n{proxy.log_tail()}")
    row.seconds = time.monotonic() - t_row


def _settle(pids: list[int], timeout: float = 5.0) -> None:
    """Wait (bounded) until the proxy's socket count stops changing, e.g. after wrk exits."""
    deadline = time.monotonic() + timeout
    last, stable_since = procfs.open_fds(pids)[1], time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = procfs.open_fds(pids)[1]
        if now != last:
            last, stable_since = now, time.monotonic()
        elif time.monotonic() - stable_since >= 0.5:
            return


def slow_readers(url: str, proxy: Server, s: Settings) -> SlowResult:
    pids = proxy.tree()
    _settle(pids)
    idle = procfs.rss_kib(pids)
    fds_idle = procfs.open_fds(pids)
    argv = [
        sys.executable,
        "-m",
        "bench.slow_readers",
        "--url",
        url,
        "-n",
        str(s.slow_n),
        "--rate",
        str(s.slow_rate),
        "--hold",
        str(s.slow_hold),
        "--ramp",
        "30",
        "--rcvbuf",
        str(s.slow_rcvbuf),
    ]
    limit = 30 + s.slow_hold + 60
    client: dict[str, Any] = {}
    t_hold = float("inf")
    with procfs.RssSampler(pids, interval=0.010, max_seconds=limit + 30) as sampler:
        proc = subprocess.Popen(
            argv, cwd=REPO, stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        killer = threading.Timer(limit, proc.kill)
        killer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("STREAMING"):
                    client["streaming_at_hold_start"] = int(line.split()[1])
                elif line.startswith("HOLD_DONE"):
                    t_hold = time.monotonic()
                elif line.startswith("RESULT "):
                    client.update(json.loads(line[len("RESULT ") :]))
            proc.wait(timeout=30)
        finally:
            killer.cancel()
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        if proc.returncode != 0:
            client["exit"] = proc.returncode
        # Let the proxy notice the closed sockets and release buffers, then sample "after".
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and procfs.open_fds(pids)[1] > fds_idle[1]:
            time.sleep(0.1)
        time.sleep(1.0)
    after = procfs.rss_kib(pids)
    fds_after = procfs.open_fds(pids)
    peak = sampler.peak_kib(until=t_hold)
    if not client:
        raise ClientError(f"slow readers gave no result (exit {proc.returncode})")
    return SlowResult(s.slow_n, idle, peak, after, fds_idle, fds_after, client)


def stop_quietly(server: Server | None) -> None:
    if server is not None:
        with contextlib.suppress(Exception):
            server.stop()
