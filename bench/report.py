"""Markdown rendering of the results, plus machine information."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence

from bench.measure import Row, Settings
from bench.servers import RELAY_LOG_POSTURE

MIB_KIB = 1024


def _run_first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None and not os.path.exists(argv[0]):
        return "not installed"
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "?"
    out = (res.stdout or res.stderr).strip().splitlines()
    return out[0] if out else "?"


def machine_info() -> list[str]:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(f.readline().split()[1])
            mem = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    versions = []
    for pkg in ("uvicorn", "httpx", "httpcore", "aiohttp", "uvloop", "starlette", "httptools"):
        try:
            versions.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{pkg} -")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    return [
        f"- nproc: {os.cpu_count()}; CPU: {cpu}; memory: {mem}",
        f"- kernel: {platform.release()}; Python {platform.python_version()} ({sys.executable})",
        f"- packages: {', '.join(versions)}",
        f"- tools: {_run_first_line([nginx, '-v'])}; {_run_first_line(['wrk', '-v'])}; "
        f"{' '.join(_run_first_line(['curl', '--version']).split()[:2])}",
    ]


def _f(v: float | None, fmt: str = ".2f", na: str = "n/a") -> str:
    return na if v is None else format(v, fmt)


def _mib(kib: int | None) -> str:
    return "—" if kib is None else f"{kib / MIB_KIB:.1f}"


def speed_table(rows: Sequence[Row], s: Settings) -> list[str]:
    direct = next((r.gbps for r in rows if r.key == "direct"), None)
    nginx = next((r.gbps for r in rows if r.key == "nginx"), None)
    size = "1 GiB" if s.big == "1g" else "256 MiB"
    out = [
        f"| target | {size} GB/s (median of {s.runs}) | min-max | xdirect | xnginx "
        f"| proxy CPU-s/GiB | req/s 1 KiB c{s.load_conns} | non-2xx / sock err "
        f"| p50 / p99 ms | proxy CPU % under load | TTFB median (p90) ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.na:
            out.append(f"| {r.label} | {r.na} |  |  |  |  |  |  |  |  |  |")
            continue
        g = r.gbps
        rng = (
            f"{min(x.gbps for x in r.tput):.2f}-{max(x.gbps for x in r.tput):.2f}"
            if r.tput
            else "n/a"
        )
        xd = _f(g / direct) if g and direct else "n/a"
        xn = _f(g / nginx) if g and nginx else "n/a"
        cpu = "—" if r.key == "direct" else _f(r.cpu)
        if r.load:
            rps = f"{r.load.rps:,.0f}"
            errs = f"{r.load.non2xx} / {r.load.errors}"
            lat = f"{_f(r.load.p50_ms)} / {_f(r.load.p99_ms)}"
        else:
            rps, errs, lat = "n/a", "n/a", "n/a"
        lcpu = "—" if r.key == "direct" else _f(r.load_cpu_pct, ".0f")
        tt = f"{r.ttfb.median_ms:.2f} ({r.ttfb.p90_ms:.2f})" if r.ttfb else "n/a"
        if r.ttfb and r.ttfb.bad:
            tt += f" {r.ttfb.bad} bad"
        out.append(
            f"| {r.label} | {_f(g)} | {rng} | {xd} | {xn} | {cpu} | {rps} | {errs} | {lat} "
            f"| {lcpu} | {tt} |"
        )
    return out


def memory_table(rows: Sequence[Row], s: Settings) -> list[str]:
    size = "1 GiB" if s.big == "1g" else "256 MiB"
    out = [
        f"| target | idle RSS MiB | peak RSS during {size} MiB | delta MiB "
        f"| VmHWM before->after MiB "
        f"| slow readers | idle -> peak MiB | KiB / stream | RSS after close MiB "
        f"| fds (sockets) idle -> after | reader rate MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.key == "direct" or r.na:
            continue
        delta = (
            _mib(r.rss_peak_kib - r.rss_idle_kib)
            if r.rss_peak_kib is not None and r.rss_idle_kib is not None
            else "—"
        )
        hwm = f"{_mib(r.hwm_before_kib)}->{_mib(r.hwm_after_kib)}"
        sl = r.slow
        if sl:
            c = sl.client
            streaming = c.get("streaming_at_hold_start", c.get("streaming", "?"))
            readers = f"{streaming}/{sl.n} streaming, {c.get('errors', '?')} err"
            idle_peak = f"{_mib(sl.idle_kib)} -> {_mib(sl.peak_kib)}"
            per = f"{sl.per_stream_kib:.0f}"
            after = _mib(sl.after_kib)
            fds = f"{sl.fds_idle[0]} ({sl.fds_idle[1]}) -> {sl.fds_after[0]} ({sl.fds_after[1]})"
            rate = f"{float(c.get('mean_rate_Bps', 0)) / 1e6:.2f}"
        else:
            readers = idle_peak = per = after = fds = rate = "n/a"
        out.append(
            f"| {r.label} | {_mib(r.rss_idle_kib)} | {_mib(r.rss_peak_kib)} | {delta} | {hwm} "
            f"| {readers} | {idle_peak} | {per} | {after} | {fds} | {rate} |"
        )
    return out


def targets(rows: Sequence[Row]) -> list[str]:
    nginx = next((r for r in rows if r.key == "nginx" and not r.na), None)
    out: list[str] = []
    for r in rows:
        if not r.key.startswith("relay") or r.na:
            continue
        checks: list[str] = []

        def mark(ok: bool | None) -> str:
            return "n/a" if ok is None else ("PASS" if ok else "FAIL")

        g, ng = r.gbps, nginx.gbps if nginx else None
        ratio = g / ng if g is not None and ng else None
        checks.append(
            f"throughput >=0.9x nginx: {_f(ratio)}x {mark(None if ratio is None else ratio >= 0.9)}"
        )
        checks.append(
            f"<=1.2 CPU-s/GiB: {_f(r.cpu)} {mark(None if r.cpu is None else r.cpu <= 1.2)}"
        )
        rps = r.load.rps if r.load else None
        clean = r.load is not None and r.load.non2xx == 0 and r.load.errors == 0
        checks.append(
            f">=3000 req/s: {_f(rps, ',.0f')} "
            f"{mark(None if rps is None else rps >= 3000 and clean)}"
            + ("" if clean or r.load is None else " (with errors)")
        )
        d = (
            (r.rss_peak_kib - r.rss_idle_kib) / 1024
            if r.rss_peak_kib is not None and r.rss_idle_kib is not None
            else None
        )
        checks.append(
            f"peak RSS <= idle+16 MiB: delta {_f(d, '.1f')} MiB "
            f"{mark(None if d is None else d <= 16)}"
        )
        per = r.slow.per_stream_kib if r.slow else None
        checks.append(
            f"<=256 KiB/slow stream: {_f(per, '.0f')} {mark(None if per is None else per <= 256)}"
        )
        out.append(f"- **{r.label}**: " + "; ".join(checks))
    return out


def workers_table(rows: Sequence[Row]) -> list[str]:
    """1 KiB relayed misses with one and two worker processes, relay beside nginx, and the
    targets: relay >= 0.15x nginx at 2 workers, and its 2-worker ratio >= its 1-worker one."""
    by_key = {r.key: r for r in rows if not r.na and r.load}
    pairs = [(1, "nginx", "relay"), (2, "nginx-2", "relay-2")]
    if not all(n in by_key and r in by_key for _, n, r in pairs):
        return []
    out = [
        "| workers | nginx req/s | relay req/s | relay / nginx | relay CPU % under load |",
        "|---:|---:|---:|---:|---:|",
    ]
    ratios: dict[int, float] = {}
    for workers, n, r in pairs:
        nginx_load, relay_load = by_key[n].load, by_key[r].load
        assert nginx_load is not None
        assert relay_load is not None
        ratios[workers] = relay_load.rps / nginx_load.rps if nginx_load.rps else 0.0
        out.append(
            f"| {workers} | {nginx_load.rps:,.0f} | {relay_load.rps:,.0f} "
            f"| {ratios[workers]:.3f}x | {_f(by_key[r].load_cpu_pct, '.0f')} |"
        )
    at_two, scales = ratios[2] >= 0.15, ratios[2] >= ratios[1]
    out += [
        "",
        f"- 1 KiB misses >= 0.15x nginx at 2 workers: {ratios[2]:.3f}x "
        f"{'PASS' if at_two else 'FAIL'}",
        f"- relay's 2-worker ratio >= its 1-worker ratio: {ratios[2]:.3f} vs {ratios[1]:.3f} "
        f"{'PASS' if scales else 'FAIL'}",
    ]
    return out


def render(rows: Sequence[Row], s: Settings, argv: Sequence[str], meta: dict[str, str]) -> str:
    lines = [
        "# relay benchmark results",
        "",
        f"`python -m bench {' '.join(argv)}` — {meta['date']}, total {meta['runtime']}",
        "",
        *machine_info(),
        f"- origin: {meta['origin']}",
        f"- load average (1/5/15 min) and machine CPU busy just before the start: "
        f"{meta['load_start']}; after the end: {meta['load_end']}",
        "- caveat: client, proxy and origin all share this machine's "
        f"{os.cpu_count()} cores (nothing pinned), so the proxies compete with curl/wrk and the "
        "origin for CPU; compare rows with each other, not with other machines.",
        f"- logging: {RELAY_LOG_POSTURE}",
        "",
        "## Speed",
        "",
        *speed_table(rows, s),
        "",
        "## Memory",
        "",
        *memory_table(rows, s),
        "",
    ]
    w = workers_table(rows)
    if w:
        lines += ["## One and two worker processes (1 KiB relayed misses)", "", *w, ""]
    t = targets(rows)
    if t:
        lines += ["## Relay vs targets", "", *t, ""]
    lines += [
        "## Method",
        "",
        f"- GB/s = 10^9 bytes/s, from curl `size_download / time_total` of a {s.big} file to "
        f"/dev/null; median of {s.runs} runs (min-max shown).",
        "- CPU-s/GiB: utime+stime (+cutime/cstime) of the proxy process tree from /proc/<pid>/stat "
        "around each transfer, divided by GiB transferred; median of the same runs. nginx "
        "row = master + its one worker.",
        f"- req/s: {next((r.load.tool for r in rows if r.load), 'wrk -t2')} on the 1 KiB "
        "file after a 1 s warm-up; proxy CPU % = proxy CPU seconds / wall seconds of the "
        "load run (100 % = one core); non-2xx = wrk's 'Non-2xx or 3xx responses', sock err = sum "
        "of wrk socket errors (connect/read/write/timeout).",
        f"- TTFB: {s.ttfb_n} sequential GETs of the 1 KiB file in one curl process (one "
        "kept-alive connection), curl `time_starttransfer`; median (p90).",
        f"- Peak RSS: VmRSS summed over the proxy process tree, sampled every 10 ms in a thread "
        f"during one {s.big} stream (the first big transfer after start + 3 warm-up requests); "
        "VmHWM before and after that transfer.",
        f"- Slow readers: {s.slow_n} concurrent raw-socket clients (SO_RCVBUF "
        f"{s.slow_rcvbuf // 1024} KiB, 16 KiB recv) GET the {s.slow_file} file, each paced to "
        f"{s.slow_rate / 1e6:g} MB/s; held {s.slow_hold:g} s once all stream; KiB/stream = "
        "(peak RSS - idle RSS) / N; RSS after close ~1 s after all sockets closed.",
        "",
    ]
    details: list[str] = []
    for r in rows:
        if r.cmd:
            details.append(f"- {r.label}: `{r.cmd}` ({r.seconds:.0f} s)")
        if r.tput:
            runs = ", ".join(f"{x.gbps:.2f}" for x in r.tput)
            cpus = ", ".join(f"{c:.2f}" for c in r.cpu_per_gib) or "—"
            ttfb0 = ", ".join(f"{x.starttransfer * 1000:.1f}" for x in r.tput)
            details.append(f"  - runs GB/s: {runs}; CPU-s/GiB: {cpus}; big-file TTFB ms: {ttfb0}")
        if r.load and r.load.detail:
            details.append(f"  - load socket errors: {r.load.detail}")
        if r.ttfb:
            details.append(
                f"  - TTFB: n={r.ttfb.n}, new connections={r.ttfb.new_connections}, "
                f"max {r.ttfb.max_ms:.2f} ms"
            )
        if r.rss_samples:
            details.append(f"  - RSS samples during big stream: {r.rss_samples}")
        if r.slow:
            c = r.slow.client
            details.append(
                f"  - slow readers: ramp {c.get('ramp_s')} s, held {c.get('held_s')} s, "
                f"mean {float(c.get('mean_body_bytes', 0)) / 1e6:.1f} MB read each, "
                f"statuses {c.get('statuses')}, first errors {c.get('first_errors')}"
            )
        for e in r.errors:
            details.append(f"  - ERROR: {e}")
    if details:
        lines += ["## Details", "", *details, ""]
    return "\n".join(lines)
