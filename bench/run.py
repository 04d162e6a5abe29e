"""Orchestration: start origin and each proxy in turn, measure, print and save the report."""

from __future__ import annotations

import argparse
import datetime
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.clients import have
from bench.measure import Row, Settings, measure, stop_quietly
from bench.procs import Server, ServerError, raise_interrupt
from bench.report import render
from bench.servers import (
    REPO,
    SIZES,
    Origin,
    ensure_data,
    nginx_path,
    relay_available,
    start_baseline,
    start_nginx_proxy,
    start_origin,
    start_relay,
)

ROW_KEYS = ("direct", "nginx", "relay", "relay-log", "baseline", "nginx-2", "relay-2")
# relay rows run with the access log off, as nginx does; relay-log is the relay row with it on.
DEFAULT_ONLY = "direct,nginx,relay,relay-log"
WORKER_ROWS = ("nginx", "relay", "nginx-2", "relay-2")
"""The rows beside each other with one and two worker processes (--workers)."""


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark relay against direct download and an nginx reverse proxy.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 256 MiB file, 3 s load, 20 slow readers held 5 s",
    )
    p.add_argument(
        "--only",
        default=DEFAULT_ONLY,
        help=f"comma-separated rows out of {','.join(ROW_KEYS)} (default {DEFAULT_ONLY})",
    )
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run the naive Starlette+httpx baseline relay row",
    )
    p.add_argument(
        "--loop",
        choices=("uvloop", "asyncio"),
        default=None,
        help="--loop for the relay rows (default: the relay's own default)",
    )
    p.add_argument(
        "--extra-relay-args",
        default="",
        help='extra arguments for every relay row, e.g. "--max-connections 200"',
    )
    p.add_argument(
        "--python-origin",
        action="store_true",
        help="use tests.origin as the origin even when nginx is installed",
    )
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results.md",
        help="where to write the Markdown report (default bench/results.md)",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="first wait up to SECONDS for the machine to be <10%% busy (default: don't wait)",
    )
    p.add_argument(
        "--workers",
        action="store_true",
        help="also run the 2-worker rows: nginx worker_processes 2 and relay --workers 2",
    )
    p.add_argument("--runs", type=int, default=3, help="big-file runs per row (median)")
    p.add_argument("--slow-readers", type=int, default=None, help="override N slow readers")
    p.add_argument("--load-seconds", type=int, default=None, help="override load duration")
    a = p.parse_args(argv)
    keys = [k.strip() for k in a.only.split(",") if k.strip()]
    bad = [k for k in keys if k not in ROW_KEYS]
    if bad:
        p.error(f"unknown row(s) {bad}; choose from {','.join(ROW_KEYS)}")
    if a.workers:
        keys += [k for k in WORKER_ROWS if k not in keys]
    if a.baseline and "baseline" not in keys:
        keys.append("baseline")
    a.keys = keys
    if not 1 <= a.runs <= 10:
        p.error("--runs must be 1..10")
    return a


def settings(a: argparse.Namespace) -> Settings:
    if a.quick:
        s = Settings(
            big="256m",
            big_bytes=SIZES["256m"],
            slow_file="256m",
            runs=a.runs,
            load_seconds=3,
            slow_n=20,
            slow_hold=5.0,
        )
    else:
        s = Settings(big="1g", big_bytes=SIZES["1g"], slow_file="1g", runs=a.runs)
    if a.slow_readers is not None:
        s.slow_n = max(1, min(1000, a.slow_readers))
    if a.load_seconds is not None:
        s.load_seconds = max(1, min(120, a.load_seconds))
    return s


def _label(key: str) -> str:
    return {
        "direct": "direct",
        "nginx": "nginx proxy",
        "relay": "relay",
        "relay-log": "relay, access log on",
        "baseline": "baseline relay",
        "nginx-2": "nginx proxy, 2 workers",
        "relay-2": "relay, 2 workers",
    }[key]


def _loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def _cpu_jiffies() -> tuple[int, int]:
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals), idle


def machine_busy_pct(window: float = 1.0) -> float:
    """Machine-wide CPU busy % over ``window`` seconds (all cores; 100 = every core busy)."""
    t0, i0 = _cpu_jiffies()
    time.sleep(window)
    t1, i1 = _cpu_jiffies()
    return 100.0 * (1 - (i1 - i0) / (t1 - t0)) if t1 > t0 else 0.0


def wait_quiet(max_wait: float, threshold: float = 10.0) -> float:
    """Wait (at most ``max_wait`` s) until the machine is below ``threshold`` % busy."""
    deadline = time.monotonic() + max_wait
    busy = machine_busy_pct()
    while busy > threshold and time.monotonic() < deadline:
        print(f"machine {busy:.0f}% busy; waiting for it to quiet down ...", flush=True)
        time.sleep(4)
        busy = machine_busy_pct()
    return busy


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(args_list)
    s = settings(a)
    signal.signal(signal.SIGTERM, raise_interrupt)
    busy_start = wait_quiet(min(a.wait_quiet, 1800.0)) if a.wait_quiet > 0 else machine_busy_pct()
    if busy_start > 10:
        print(f"warning: machine already {busy_start:.0f}% busy; results will be noisy", flush=True)
    t_start = time.monotonic()
    load_start = f"{_loadavg()} ({busy_start:.0f}% CPU busy)"
    rows: list[Row] = []
    origin: Origin | None = None
    proxy: Server | None = None
    use_nginx = nginx_path() is not None and not a.python_origin
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmpdir:
        tmp = Path(tmpdir)
        log_dir = tmp / "logs"
        log_dir.mkdir()
        try:
            if use_nginx:
                print("creating test files on /dev/shm ...", flush=True)
                ensure_data(["1k", s.big, s.slow_file])
            print(f"starting origin ({'nginx' if use_nginx else 'tests.origin'}) ...", flush=True)
            origin = start_origin(tmp, log_dir, use_nginx)
            origin_desc = (
                f"nginx (1 worker, sendfile) serving files from /dev/shm/relay-bench/data, "
                f"port {origin.server.port}"
                if origin.kind == "nginx"
                else f"python -m tests.origin (nginx not installed), port {origin.server.port}"
            )
            relay_ok, relay_why = (True, "")
            if any(k.startswith("relay") for k in a.keys):
                relay_ok, relay_why = relay_available()
            for key in a.keys:
                row = Row(key=key, label=_label(key))
                rows.append(row)
                print(f"== {row.label}", flush=True)
                proxy = None
                try:
                    if key == "direct":
                        measure(row, f"http://127.0.0.1:{origin.server.port}", origin.path, None, s)
                        row.cmd = f"origin: {origin_desc}"
                        continue
                    if key in ("nginx", "nginx-2"):
                        if nginx_path() is None:
                            row.na = "n/a (nginx not installed)"
                            continue
                        workers = 2 if key == "nginx-2" else 1
                        proxy = start_nginx_proxy(origin.server.port, tmp, log_dir, workers=workers)
                        row.cmd = (
                            f"nginx {workers} worker(s), proxy_buffering off, proxy_buffers 8 "
                            "64k, proxy_buffer_size 64k, HTTP/1.1 upstream keepalive 128"
                        )
                        base, prefix = f"http://127.0.0.1:{proxy.port}", ""
                    elif key == "baseline":
                        proxy, row.cmd = start_baseline(origin, log_dir)
                        base, prefix = f"http://127.0.0.1:{proxy.port}", "/o"
                    else:
                        if not relay_ok:
                            row.na = f"n/a (relay serve not available: {relay_why[:120]})"
                            continue
                        proxy, row.cmd = start_relay(
                            row.label,
                            origin,
                            tmp,
                            log_dir,
                            a.loop,
                            a.extra_relay_args,
                            access_log=key == "relay-log",
                            workers=2 if key == "relay-2" else 1,
                        )
                        base, prefix = f"http://127.0.0.1:{proxy.port}", "/o"
                    orig = origin

                    def path(name: str, prefix: str = prefix, orig: Origin = orig) -> str:
                        return prefix + orig.path(name)

                    measure(row, base, path, proxy, s)
                except ServerError as e:
                    row.na = "n/a (failed to start)"
                    row.errors.append(str(e))
                    print(f"  {row.label}: {e}", flush=True)
                finally:
                    if proxy is not None:
                        tail = proxy.log_tail(8).strip()
                        if tail and row.errors:
                            row.errors.append(f"{row.label} log tail:\n{tail}")
                        stop_quietly(proxy)
                        proxy = None
        except KeyboardInterrupt:
            print("\ninterrupted; stopping servers", flush=True)
            return 130
        finally:
            stop_quietly(proxy)
            if origin is not None:
                stop_quietly(origin.server)
        if not have("wrk"):
            print("note: wrk not installed, req/s uses the aiohttp fallback", flush=True)
        runtime = time.monotonic() - t_start
        meta = {
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "runtime": f"{runtime:.0f} s",
            "origin": origin_desc,
            "load_start": load_start,
            "load_end": f"{_loadavg()} ({machine_busy_pct(0.5):.0f}% CPU busy)",
        }
        text = render(rows, s, args_list, meta)
    print()
    print(text)
    a.output.write_text(text + "\n")
    print(f"(written to {a.output}; total runtime {runtime:.0f} s)")
    return 0
