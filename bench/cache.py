"""``python -m bench.cache`` (or ``python -m bench --cache``): relay's read-through cache beside
nginx ``proxy_cache``.

Three sides against the same two upstreams, both on loopback: ``/o/`` is ``tests.origin``
running in this process (it counts the body bytes it sends and paces them: the cold scenario);
``/f/`` is an nginx file server over tmpfs with ``Cache-Control: max-age=3600`` (the warm
scenarios, so that relay's uncached figures are not bounded by the Python origin; without nginx
``/f/`` is ``tests.origin`` too). The sides:

* ``nginx``: nginx with ``proxy_cache`` + ``proxy_cache_lock`` + ``sendfile``;
* ``relay``: relay without a cache (the reference for what the cache must beat);
* ``relay-cache``: relay with ``--cache-dir`` / ``--cache-max-bytes``;
* ``nginx-2``, ``relay-cache-2``: the same caches with two worker processes (nginx
  ``worker_processes 2``, relay ``--workers 2``: one cache shared by both workers). Each is
  compared with the nginx of its own worker count; the cold scenario's 16 clients reach both
  relay workers (the kernel spreads the connections), so it measures coalescing across them.

Logging posture: nginx runs with ``access_log off``, and so do the relay sides
(``--access-log false``): like for like. Not to hide what relay's access log costs, each relay
side's 1 KiB hits are also measured with a second relay process with the access log on
(written to its log file, as in a deployment), in a row of their own.

Scenarios: warm 1 GiB hit throughput, with every side's server up at once and the curl runs
interleaved (round r: one run per side, the order rotated each round), so that the machine's
drift between minutes hits every side alike; the ratio to nginx is the median of the per-round
ratios. Then, per side in turn: 1 KiB hits per
second (wrk, 64 connections); 16 cold clients of a 64 MiB object from a 40 MB/s origin (origin
body bytes and requests, each client's time to first byte, sha256 of every body); RSS per slow
reader on hits (``bench.slow_readers``). Everything listens on 127.0.0.1; every loop and every
client is bounded; every server is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import http.client
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.clients import ClientError, curl_get, have, run_load
from bench.measure import Settings, slow_readers, stop_quietly
from bench.procs import Server, ServerError, free_port, raise_interrupt, start_server
from bench.report import machine_info
from bench.servers import (
    RELAY_LOG_POSTURE,
    REPO,
    _nginx_common,
    _nginx_http_common,
    _start_nginx,
    ensure_data,
    nginx_file_server_conf,
    nginx_path,
    relay_available,
    relay_log_args,
    relay_serve_argv,
)
from tests.origin import Origin, expected_sha256

SIDES = ("nginx", "relay", "relay-cache", "nginx-2", "relay-cache-2")
LABELS = {
    "nginx": "nginx proxy_cache",
    "relay": "relay (no cache)",
    "relay-cache": "relay --cache-dir",
    "nginx-2": "nginx proxy_cache, 2 workers",
    "relay-cache-2": "relay --cache-dir --workers 2",
}
WORKERS = {"nginx-2": 2, "relay-cache-2": 2}
"""Worker processes of each side (1 when not listed)."""
MIB = 1024 * 1024
GIB = 1024 * MIB
COLD_SIZE = 64 * MIB
COLD_CLIENTS = 16
COLD_RATE = 40_000_000  # origin bytes/s for the cold scenario (tests.origin ``slow``)
CACHE_MAX_BYTES = 8 * GIB  # both caches' budget; the run stores ~1.1 GiB per side
HIT_MARK = {
    "nginx": ("x-cache-status", "HIT"),
    "relay-cache": ("cache-status", "relay; hit"),
    "nginx-2": ("x-cache-status", "HIT"),
    "relay-cache-2": ("cache-status", "relay; hit"),
}


def nginx_of(key: str) -> str:
    """The nginx side a side is compared with: the one with as many workers."""
    return "nginx-2" if WORKERS.get(key, 1) == 2 else "nginx"


def is_nginx(key: str) -> bool:
    return key.startswith("nginx")


class SideError(RuntimeError):
    pass


@dataclass
class Side:
    key: str
    server: Server | None = None
    command: str = ""
    error: str | None = None
    hit_gbps: list[float] = field(default_factory=list)
    hit_ratios: list[float] = field(default_factory=list)
    """Per round: this side's GB/s over nginx's in the same round (sides other than nginx)."""
    zero_copy: tuple[int, int, int] | None = None
    """relay-cache after the hit runs: (relay_cache_bytes_zero_copy_total, its growth over the
    counted runs, relay_cache_bytes_from_cache_total's growth over them)."""
    rps: float | None = None
    rps_errors: int | None = None
    rps_tool: str = ""
    rps_logged: float | None = None
    """1 KiB hits/s of the same relay side with its access log on (a second process)."""
    cold_origin_bytes: int | None = None
    cold_origin_requests: int | None = None
    cold_ttfb: list[float] = field(default_factory=list)
    cold_total: list[float] = field(default_factory=list)
    cold_bad: list[str] = field(default_factory=list)
    slow_kib_per_reader: float | None = None
    slow_detail: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.key]

    @property
    def hit_median(self) -> float | None:
        return statistics.median(self.hit_gbps) if self.hit_gbps else None

    @property
    def hit_ratio(self) -> float | None:
        """The median of the per-round ratios to nginx."""
        return statistics.median(self.hit_ratios) if self.hit_ratios else None


# -------------------------------------------------------------------------- servers ---


@dataclass
class Upstreams:
    origin: Origin  # tests.origin: counts body bytes, paces with ``slow``
    files_url: str  # base URL behind /f/
    files_gen: bool  # /f/ is tests.origin (``/gen/<size>``), not the nginx file server
    files: Server | None = None

    def warm_path(self, name: str) -> str:
        return f"/f/gen/{name}" if self.files_gen else f"/f/{name}"


def start_upstreams(origin: Origin, tmp: Path, log_dir: Path) -> Upstreams:
    """The file server behind /f/: nginx over tmpfs with an hour's freshness, when installed."""
    if nginx_path() is None:
        return Upstreams(origin, f"{origin.url}/", True)
    ensure_data(["1k", "256m", "1g"])
    port = free_port()
    workdir = tmp / "nginx-files"
    conf = nginx_file_server_conf(workdir, port, extra="        expires 1h;\n")
    server = _start_nginx("files-nginx", conf, workdir, port, log_dir)
    try:
        server.wait_ready("/1k", timeout=30)
    except BaseException:  # also an interrupt (SIGTERM, Ctrl-C) while it starts
        server.stop()
        raise
    return Upstreams(origin, f"http://127.0.0.1:{port}/", False, server)


def start_nginx_cache(
    up: Upstreams, tmp: Path, log_dir: Path, workers: int = 1
) -> tuple[Server, str]:
    """nginx as a caching reverse proxy: proxy_cache + proxy_cache_lock + sendfile, with
    `workers` worker processes."""
    if nginx_path() is None:
        raise SideError("nginx is not installed (apt-get install -y nginx)")
    port = free_port()
    workdir = tmp / f"nginx-cache-{workers}"
    cache = workdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    conf = (
        _nginx_common(workdir, workers)
        + f"""http {{
{_nginx_http_common(workdir)}    sendfile on;
    tcp_nopush on;
    proxy_cache_path {cache} levels=1:2 keys_zone=bench:16m max_size={CACHE_MAX_BYTES}
                     inactive=1h use_temp_path=off;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_cache bench;
    proxy_cache_lock on;
    proxy_cache_valid 200 1h;
    add_header X-Cache-Status $upstream_cache_status always;
    upstream origin {{
        server 127.0.0.1:{up.origin.port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /healthz {{ return 200 "ok\\n"; }}
        location /o/ {{ proxy_pass http://origin/; }}
        location /f/ {{ proxy_pass {up.files_url}; }}
    }}
}}
"""
    )
    server = _start_nginx(f"nginx-cache-{workers}", conf, workdir, port, log_dir)
    try:
        server.wait_ready("/healthz", timeout=30)
    except BaseException:  # also an interrupt (SIGTERM, Ctrl-C) while it starts
        server.stop()
        raise
    return server, f"nginx -c {workdir / 'nginx.conf'}"


def start_relay_side(
    up: Upstreams,
    tmp: Path,
    log_dir: Path,
    cache_dir: Path | None,
    extra_args: str,
    *,
    access_log: bool = False,
    workers: int = 1,
) -> tuple[Server, str]:
    name = ("relay-cache" if cache_dir else "relay") + ("-log" if access_log else "")
    if workers > 1:
        name += f"-{workers}"
    cfg = tmp / f"{name}.toml"
    cfg.write_text(
        "".join(
            f'[[routes]]\nprefix = "{prefix}"\nupstream = "{url}"\nallow_private = true\n'
            for prefix, url in (("/o/", f"{up.origin.url}/"), ("/f/", up.files_url))
        )
    )
    port = free_port()
    argv = relay_serve_argv(
        port, "--config", str(cfg), "--log-level", "warning", *relay_log_args(access_log)
    )
    if cache_dir is not None:
        argv += ["--cache-dir", str(cache_dir), "--cache-max-bytes", str(CACHE_MAX_BYTES)]
    if workers > 1:
        argv += ["--workers", str(workers)]
    argv += shlex.split(extra_args)
    server = start_server(name, argv, port, log_dir, cwd=REPO)
    try:
        server.wait_ready("/healthz", timeout=30)
    except BaseException:  # also an interrupt (SIGTERM, Ctrl-C) while it starts
        server.stop()
        raise
    return server, shlex.join(["python", *argv[1:]])


# ------------------------------------------------------------------------ scenarios ---


def _get_head(port: int, path: str, timeout: float = 60.0) -> tuple[int, dict[str, str], int]:
    """GET ``path``; returns (status, lower-cased headers, body length), reading the body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        n = 0
        while chunk := resp.read(1 << 20):
            n += len(chunk)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, n
    finally:
        conn.close()


def warm(side: Side, path: str, size: int) -> None:
    """Fetch ``path`` until the side answers it from its cache (bounded: 5 tries)."""
    assert side.server is not None
    mark = HIT_MARK.get(side.key)
    if mark is None:  # no cache: one plain GET
        status, _, n = _get_head(side.server.port, path)
        if status != 200 or n != size:
            raise SideError(f"GET {path}: {status}, {n} bytes (want 200, {size})")
        return
    for _ in range(5):
        status, headers, n = _get_head(side.server.port, path)
        if status != 200 or n != size:
            raise SideError(f"GET {path}: {status}, {n} bytes (want 200, {size})")
        if headers.get(mark[0], "").startswith(mark[1]):
            return
        time.sleep(0.2)  # nginx publishes the entry just after the response ends
    raise SideError(f"GET {path} is not a cache hit after 5 tries ({mark[0]}: {mark[1]} missing)")


def relay_cache_counters(side: Side) -> dict[str, int]:
    """relay's ``relay_cache_*_total`` counters from its /metrics (name without the prefix)."""
    assert side.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", side.server.port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode(errors="replace")
    finally:
        conn.close()
    if resp.status != 200:
        raise SideError(f"GET /metrics: {resp.status}")
    out: dict[str, int] = {}
    for m in re.finditer(r"^relay_cache_(\w+)_total(?:\{\})? (\S+)$", text, re.MULTILINE):
        out[m.group(1)] = int(float(m.group(2)))
    return out


def interleaved_hits(sides: Sequence[Side], path: str, size: int, runs: int) -> list[list[str]]:
    """Warm hit throughput, every side's server up: one uncounted warm-up GET per side (which
    also checks the cache sides answer a hit), then ``runs`` rounds of one curl per side, the
    order rotated each round. Returns each round's order. A side whose warm-up or run fails gets
    a note and sits out the rest; every loop is bounded by ``runs`` and the sides."""
    live: list[Side] = []
    for side in sides:
        try:
            warm(side, path, size)
        except (SideError, ClientError, OSError, http.client.HTTPException) as e:
            side.notes.append(f"hits: warm-up: {e}")
            continue
        live.append(side)
    before: dict[str, int] = {}
    cache_side = next((x for x in live if x.key == "relay-cache"), None)
    if cache_side is not None:
        try:
            before = relay_cache_counters(cache_side)
        except (SideError, OSError, http.client.HTTPException, ValueError) as e:
            cache_side.notes.append(f"hits: /metrics before the runs: {e}")
    orders: list[list[str]] = []
    for r in range(runs):
        if not live:
            break
        k = r % len(live)
        order = live[k:] + live[:k]
        orders.append([x.key for x in order])
        got: dict[str, float] = {}
        for side in order:
            assert side.server is not None
            try:
                res = curl_get(f"http://127.0.0.1:{side.server.port}{path}")
                if res.size != size:
                    raise SideError(f"curl {path}: {res.size} bytes, want {size}")
            except (SideError, ClientError, OSError, subprocess.SubprocessError) as e:
                side.notes.append(f"hits: round {r + 1}: {e}")
                if not side.server.alive():
                    live.remove(side)
                continue
            side.hit_gbps.append(res.gbps)
            got[side.key] = res.gbps
        for side in order:
            base = got.get(nginx_of(side.key))
            if not is_nginx(side.key) and base and side.key in got:
                side.hit_ratios.append(got[side.key] / base)
    if cache_side is not None and before and cache_side.server is not None:
        try:
            after = relay_cache_counters(cache_side)
            zc = after.get("bytes_zero_copy")
            if zc is None:
                cache_side.notes.append("hits: /metrics has no relay_cache_bytes_zero_copy_total")
            else:
                cache_side.zero_copy = (
                    zc,
                    zc - before.get("bytes_zero_copy", 0),
                    after.get("bytes_from_cache", 0) - before.get("bytes_from_cache", 0),
                )
        except (SideError, OSError, http.client.HTTPException, ValueError) as e:
            cache_side.notes.append(f"hits: /metrics after the runs: {e}")
    return orders


def small_hits(side: Side, path: str, seconds: int) -> None:
    assert side.server is not None
    warm(side, path, 1024)
    url = f"http://127.0.0.1:{side.server.port}{path}"
    run_load(url, 64, 1)  # warm-up
    res = run_load(url, 64, seconds)
    side.rps, side.rps_errors, side.rps_tool = res.rps, res.non2xx + res.errors, res.tool


def small_hits_logged(
    side: Side,
    up: Upstreams,
    tmp: Path,
    log_dir: Path,
    path: str,
    a: argparse.Namespace,
    s: Settings,
) -> None:
    """The 1 KiB hits again, with a second process of this relay side whose access log is on."""
    cache_dir = tmp / "relay-cache-log" if side.key == "relay-cache" else None
    server, _ = start_relay_side(up, tmp, log_dir, cache_dir, a.extra_relay_args, access_log=True)
    try:
        logged = Side(side.key, server=server)
        small_hits(logged, path, s.load_seconds)
        side.rps_logged = logged.rps
        if logged.rps_errors:
            side.notes.append(f"1k, access log on: {logged.rps_errors} errors")
    finally:
        stop_quietly(server)


def _wait_origin_quiet(origin: Origin, quiet: float = 0.5, limit: float = 30.0) -> None:
    """Until the origin has sent no body byte for ``quiet`` seconds (at most ``limit``); idle
    kept-alive connections do not count."""
    deadline = time.monotonic() + limit
    last, since = origin.body_bytes, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = origin.body_bytes
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return


def cold_clients(side: Side, origin: Origin, path: str, tmp: Path) -> None:
    """``COLD_CLIENTS`` curls started together on an object no side has seen."""
    assert side.server is not None
    url = f"http://127.0.0.1:{side.server.port}{path}"
    outdir = Path(tempfile.mkdtemp(prefix="cold-", dir="/dev/shm"))
    _wait_origin_quiet(origin)
    bytes0, reqs0 = origin.body_bytes, len(origin.requests)
    procs: list[subprocess.Popen[str]] = []
    try:
        for i in range(COLD_CLIENTS):
            procs.append(
                subprocess.Popen(
                    [
                        "curl",
                        "-s",
                        "--max-time",
                        "120",
                        "-o",
                        str(outdir / f"c{i}"),
                        "-w",
                        "%{http_code} %{size_download} %{time_starttransfer} %{time_total}",
                        url,
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        want = expected_sha256(COLD_SIZE)
        for i, p in enumerate(procs):
            out, _ = p.communicate(timeout=150)
            parts = out.split()
            if p.returncode != 0 or len(parts) != 4 or parts[0] != "200":
                side.cold_bad.append(f"client {i}: exit {p.returncode}, {out!r}")
                continue
            side.cold_ttfb.append(float(parts[2]))
            side.cold_total.append(float(parts[3]))
            h = hashlib.sha256()
            with open(outdir / f"c{i}", "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
            if h.hexdigest() != want:
                side.cold_bad.append(f"client {i}: body sha256 differs ({parts[1]} bytes)")
        # The origin may still be sending to a fill the clients no longer wait for.
        _wait_origin_quiet(origin)
        side.cold_origin_bytes = origin.body_bytes - bytes0
        side.cold_origin_requests = len(origin.requests) - reqs0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        shutil.rmtree(outdir, ignore_errors=True)


def slow_on_hits(side: Side, path: str, size: int, s: Settings) -> None:
    assert side.server is not None
    warm(side, path, size)
    r = slow_readers(f"http://127.0.0.1:{side.server.port}{path}", side.server, s)
    side.slow_kib_per_reader = r.per_stream_kib
    c = r.client
    side.slow_detail = (
        f"{r.n} readers at {s.slow_rate / 1e6:g} MB/s held {s.slow_hold:g} s: idle "
        f"{r.idle_kib / 1024:.0f} MiB, peak {r.peak_kib / 1024:.0f} MiB, "
        f"streaming {c.get('streaming_at_hold_start', '?')}, errors {c.get('errors', '?')}"
    )


# --------------------------------------------------------------------------- report ---


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def table(sides: Sequence[Side]) -> list[str]:
    cols = [s.label for s in sides]
    hit_of = {s.key: s.hit_median for s in sides}
    rps_of = {s.key: s.rps for s in sides}
    rows: list[tuple[str, list[str]]] = [
        ("warm hit, GB/s (median, interleaved)", [_f(s.hit_median, ".2f") for s in sides]),
        (
            "warm hit, GB/s (min-max)",
            [
                f"{min(s.hit_gbps):.2f}-{max(s.hit_gbps):.2f}" if s.hit_gbps else "n/a"
                for s in sides
            ],
        ),
        (
            "warm hit, x nginx (same workers): median of per-round ratios",
            ["-" if is_nginx(s.key) else _x(s.hit_ratio) for s in sides],
        ),
        (
            "warm hit, x nginx (same workers): ratio of medians",
            [
                "-" if is_nginx(s.key) else _ratio(s.hit_median, hit_of.get(nginx_of(s.key)))
                for s in sides
            ],
        ),
        ("1 KiB hits, req/s (wrk -c64)", [_f(s.rps, ".0f") for s in sides]),
        (
            "1 KiB hits, x nginx (same workers)",
            ["-" if is_nginx(s.key) else _ratio(s.rps, rps_of.get(nginx_of(s.key))) for s in sides],
        ),
        (
            "1 KiB hits, req/s, relay's access log on",
            ["(off)" if is_nginx(s.key) else _f(s.rps_logged, ".0f") for s in sides],
        ),
        (
            f"cold {COLD_CLIENTS}x 64 MiB: origin bytes (x object)",
            [
                "n/a"
                if s.cold_origin_bytes is None
                else f"{s.cold_origin_bytes} ({s.cold_origin_bytes / COLD_SIZE:.2f}x)"
                for s in sides
            ],
        ),
        (
            f"cold {COLD_CLIENTS}x 64 MiB: latest first byte, s",
            [_f(max(s.cold_ttfb) if s.cold_ttfb else None, ".3f") for s in sides],
        ),
        (
            f"cold {COLD_CLIENTS}x 64 MiB: last client done, s",
            [_f(max(s.cold_total) if s.cold_total else None, ".2f") for s in sides],
        ),
        ("RSS per slow reader on hits, KiB", [_f(s.slow_kib_per_reader, ".0f") for s in sides]),
    ]
    out = ["| | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, vals in rows:
        out.append(f"| {name} | " + " | ".join(vals) + " |")
    return out


def targets(by: dict[str, Side]) -> list[str]:
    n, r, c = by.get("nginx"), by.get("relay"), by.get("relay-cache")

    def mark(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "MISS")

    hit = c.hit_ratio if c else None
    nh = n.hit_median if n else None
    rps_c, rps_n, rps_r = (c.rps if c else None), (n.rps if n else None), (r.rps if r else None)
    ob = c.cold_origin_bytes if c else None
    tt = max(c.cold_ttfb) if c and c.cold_ttfb else None
    lines = [
        f"- hit throughput ≥ 0.8x nginx (median of per-round ratios): {_x(hit)} "
        f"(ratio of medians {_ratio(c.hit_median if c else None, nh)}) → "
        + mark(None if hit is None else hit >= 0.8),
        f"- 1 KiB hits ≥ 0.15x nginx and above relay uncached: {_ratio(rps_c, rps_n)} of nginx, "
        f"{_ratio(rps_c, rps_r)} of uncached → "
        + mark(
            None
            if rps_c is None or rps_n is None or rps_r is None
            else rps_c >= 0.15 * rps_n and rps_c > rps_r
        ),
        f"- cold origin bytes ≤ 1.1x the object, latest first byte < 0.1 s: "
        f"{_ratio(float(ob) if ob is not None else None, float(COLD_SIZE))}, "
        f"{_f(tt, '.3f')} s → "
        + mark(None if ob is None or tt is None else ob <= 1.1 * COLD_SIZE and tt < 0.1),
    ]
    n2, c2 = by.get("nginx-2"), by.get("relay-cache-2")
    if n2 is None and c2 is None:
        return lines
    rps_c2, rps_n2 = (c2.rps if c2 else None), (n2.rps if n2 else None)
    one = rps_c / rps_n if rps_c and rps_n else None
    two = rps_c2 / rps_n2 if rps_c2 and rps_n2 else None
    hit2 = c2.hit_ratio if c2 else None
    ob2 = c2.cold_origin_bytes if c2 else None
    lines += [
        f"- 2 workers, 1 KiB hits ≥ 0.3x nginx with 2 workers: {_x(two)} → "
        + mark(None if two is None else two >= 0.3),
        f"- 2 workers scale at least as nginx does (1 KiB hits, ratio to nginx at 2 workers ≥ "
        f"at 1): {_x(two)} vs {_x(one)} → "
        + mark(None if one is None or two is None else two >= one),
        f"- 2 workers, hit throughput ratio to nginx at 2 workers ≥ at 1: {_x(hit2)} vs "
        f"{_x(hit)} → " + mark(None if hit is None or hit2 is None else hit2 >= hit),
        f"- 2 workers, cold origin bytes ≤ 1.1x the object (coalesced across workers): "
        f"{_ratio(float(ob2) if ob2 is not None else None, float(COLD_SIZE))} → "
        + mark(None if ob2 is None else ob2 <= 1.1 * COLD_SIZE),
    ]
    return lines


def render(
    sides: Sequence[Side],
    argv: Sequence[str],
    s: Settings,
    runs: int,
    up_files_gen: bool,
    orders: Sequence[Sequence[str]] = (),
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"# relay cache benchmark ({now})",
        "",
        f"`{shlex.join(['python', '-m', 'bench.cache', *argv])}`",
        "",
        *machine_info(),
        "",
        *table(sides),
        "",
        "## Targets (relay --cache-dir, with 1 and 2 workers)",
        "",
        *targets({s.key: s for s in sides}),
        "",
        "## Details",
        "",
        f"- upstreams: `/o/` tests.origin in the bench process (cold object "
        f"`/o/gen/64m?slow={COLD_RATE}`, {COLD_RATE / 1e6:g} MB/s, a fresh `key=` per side); "
        f"`/f/` {'tests.origin' if up_files_gen else 'nginx over tmpfs, expires 1h'} "
        f"(warm objects `{'/f/gen/' if up_files_gen else '/f/'}<1g|256m|1k>`); "
        f"slow readers: {s.slow_n} at {s.slow_rate / 1e6:g} MB/s.",
        f"- warm hit throughput (`{s.big}` object, curl to /dev/null): every side's server "
        f"runs through this scenario; after one uncounted warm-up GET per side (for the cache "
        f"sides it must answer a hit: nginx `X-Cache-Status: HIT`, relay "
        f"`Cache-Status: relay; hit`), {runs} rounds of one run per side, interleaved, the "
        f"order rotated each round (orders: "
        + ("; ".join(" > ".join(o) for o in orders) or "none")
        + "). Each side's figure is the median (and min-max) of its runs; its ratio to nginx "
        "is the median of the per-round ratios (that side / nginx in the same round), shown "
        "beside the ratio of the medians. The target uses the median of per-round ratios: "
        "the machine's speed drifts between minutes, and a round's runs share a minute.",
        f'- logging: {RELAY_LOG_POSTURE} (the row "access log on": a second relay process '
        "of the side, 1 KiB hits only).",
    ]
    for side in sides:
        lines.append(f"- **{side.label}**: `{side.command or 'not started'}`")
        if side.error:
            lines.append(f"  - FAILED: {side.error}")
        if side.hit_gbps:
            runs_s = ", ".join(f"{g:.2f}" for g in side.hit_gbps)
            lines.append(f"  - hit runs GB/s, by round: {runs_s}")
        if side.hit_ratios:
            ratios_s = ", ".join(f"{g:.2f}" for g in side.hit_ratios)
            lines.append(f"  - per-round ratios to nginx: {ratios_s}")
        if side.zero_copy is not None:
            zc, dzc, dfc = side.zero_copy
            lines.append(
                f"  - relay_cache_bytes_zero_copy_total after the hit runs: {zc} "
                f"({dzc} during the counted runs, of {dfc} bytes from cache: "
                f"{'sendfile' if dfc and dzc >= dfc else 'not all zero-copy'})"
            )
        if side.rps is not None:
            lines.append(f"  - {side.rps_tool}: {side.rps:.0f} req/s, errors {side.rps_errors}")
        if side.cold_ttfb:
            tt = ", ".join(f"{t:.3f}" for t in sorted(side.cold_ttfb))
            lines.append(
                f"  - cold: origin requests {side.cold_origin_requests}, first bytes (s): {tt}"
            )
        for b in side.cold_bad:
            lines.append(f"  - cold client error: {b}")
        if side.slow_detail:
            lines.append(f"  - slow readers: {side.slow_detail}")
        for note in side.notes:
            lines.append(f"  - {note}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- main ---


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.cache",
        description="relay's read-through cache beside nginx proxy_cache (see bench/README.md).",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 256 MiB hit object, 3 s load")
    p.add_argument(
        "--only",
        default=",".join(SIDES),
        help=f"comma-separated sides out of {','.join(SIDES)} (default: all)",
    )
    p.add_argument(
        "--runs", type=int, default=5, help="hit-throughput rounds (interleaved; default 5)"
    )
    p.add_argument("--slow-readers", type=int, default=None, help="override N slow readers")
    p.add_argument("--extra-relay-args", default="", help="extra arguments for the relay sides")
    p.add_argument(
        "--output",
        type=Path,
        default=REPO / "bench" / "results-cache.md",
        help="where to write the Markdown report (default bench/results-cache.md)",
    )
    a = p.parse_args(argv)
    a.sides = [k.strip() for k in a.only.split(",") if k.strip()]
    bad = [k for k in a.sides if k not in SIDES]
    if bad:
        p.error(f"unknown side(s) {bad}; choose from {','.join(SIDES)}")
    if not 1 <= a.runs <= 10:
        p.error("--runs must be 1..10")
    return a


@contextlib.contextmanager
def _side(side: Side) -> Iterator[None]:
    """Records a side's failure in ``side.error`` (the caller stops its server)."""
    try:
        yield
    except (
        SideError,
        ServerError,
        ClientError,
        OSError,
        subprocess.SubprocessError,
        http.client.HTTPException,
    ) as e:
        side.error = str(e)
        if side.server is not None and not side.server.alive():
            side.error += "\n" + side.server.log_tail()


def start_side(side: Side, up: Upstreams, tmp: Path, log_dir: Path, a: argparse.Namespace) -> None:
    workers = WORKERS.get(side.key, 1)
    if is_nginx(side.key):
        side.server, side.command = start_nginx_cache(up, tmp, log_dir, workers)
    elif side.key == "relay":
        side.server, side.command = start_relay_side(up, tmp, log_dir, None, a.extra_relay_args)
    else:
        ok, why = relay_available()
        if not ok:
            raise SideError(why)
        side.server, side.command = start_relay_side(
            up, tmp, log_dir, tmp / side.key, a.extra_relay_args, workers=workers
        )


def run_side(
    side: Side, up: Upstreams, tmp: Path, log_dir: Path, a: argparse.Namespace, s: Settings
) -> None:
    """The scenarios after the interleaved hits, for one side whose server is up."""
    big = "256m" if a.quick else "1g"
    big_size = 256 * MIB if a.quick else GIB
    big_path, small_path = up.warm_path(big), up.warm_path("1k")
    cold_path = f"/o/gen/64m?slow={COLD_RATE}&key={side.key}"
    with _side(side):
        if side.server is not None and not side.server.alive():
            raise SideError(f"{side.label} died during hits")
        steps: list[tuple[str, Callable[[], None]]] = [
            ("1k", lambda: small_hits(side, small_path, s.load_seconds)),
            ("cold", lambda: cold_clients(side, up.origin, cold_path, tmp)),
            ("slow", lambda: slow_on_hits(side, big_path, big_size, s)),
        ]
        if not is_nginx(side.key) and WORKERS.get(side.key, 1) == 1:
            steps.insert(
                1,
                (
                    "1k-log",
                    lambda: small_hits_logged(side, up, tmp, log_dir, small_path, a, s),
                ),
            )
        for name, step in steps:
            try:
                step()
            except (
                SideError,
                ClientError,
                OSError,
                subprocess.SubprocessError,
                http.client.HTTPException,
            ) as e:
                side.notes.append(f"{name}: {e}")
                if side.server is not None and not side.server.alive():
                    raise SideError(f"{side.label} died during {name}") from e


def _stop_side(side: Side) -> None:
    stop_quietly(side.server)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(args)
    s = Settings(
        big="256m" if a.quick else "1g",
        big_bytes=256 * MIB if a.quick else GIB,
        slow_file="256m" if a.quick else "1g",
        runs=a.runs,
        load_seconds=3 if a.quick else 10,
        slow_n=20 if a.quick else 100,
        slow_hold=5.0 if a.quick else 10.0,
    )
    if a.slow_readers is not None:
        s.slow_n = max(1, min(1000, a.slow_readers))
    if not have("curl"):
        print("curl is required", file=sys.stderr)
        return 2
    if not have("wrk"):
        print("note: wrk is not installed; 1 KiB hits use the weaker aiohttp generator")
    sides = [Side(k) for k in a.sides]
    old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    old_hup = signal.signal(signal.SIGHUP, raise_interrupt)
    try:
        with (
            tempfile.TemporaryDirectory(prefix="relay-bench-cache-") as tmp_s,
            Origin(record=True) as origin,
            contextlib.ExitStack() as stops,
        ):
            tmp = Path(tmp_s)
            log_dir = tmp / "logs"
            log_dir.mkdir()
            up = start_upstreams(origin, tmp, log_dir)
            stops.callback(stop_quietly, up.files)
            for side in sides:
                # Registered before the start, so a server started by a start that then fails
                # (or is interrupted) is stopped too.
                stops.callback(_stop_side, side)
                print(f"== start {side.label}", flush=True)
                with _side(side):
                    start_side(side, up, tmp, log_dir, a)
                if side.error:
                    print(f"   FAILED: {side.error}", flush=True)
            up_sides = [x for x in sides if x.error is None]
            print(
                f"== warm hits, {a.runs} interleaved rounds: {', '.join(x.key for x in up_sides)}",
                flush=True,
            )
            orders = interleaved_hits(up_sides, up.warm_path(s.big), s.big_bytes, a.runs)
            for side in up_sides:
                print(f"== {side.label}", flush=True)
                run_side(side, up, tmp, log_dir, a, s)
                stop_quietly(side.server)
                print(f"   {'FAILED: ' + side.error if side.error else 'done'}", flush=True)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
    report = render(sides, args, s, a.runs, up.files_gen, orders)
    print(report)
    with contextlib.suppress(OSError):
        a.output.write_text(report)
    return 1 if any(side.error for side in sides) else 0


if __name__ == "__main__":
    raise SystemExit(main())
