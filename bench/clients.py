"""Load clients: curl (single stream, TTFB), wrk (req/s) and a bounded aiohttp fallback."""

from __future__ import annotations

import asyncio
import re
import shutil
import statistics
import subprocess
import time
from dataclasses import dataclass, field


class ClientError(RuntimeError):
    pass


def have(tool: str) -> bool:
    return shutil.which(tool) is not None


@dataclass
class CurlResult:
    status: int
    size: int
    total: float
    starttransfer: float

    @property
    def gbps(self) -> float:
        return self.size / self.total / 1e9 if self.total > 0 else 0.0


def curl_get(url: str, max_time: float = 300.0) -> CurlResult:
    """One GET with curl to /dev/null; fails unless the status is 200."""
    res = subprocess.run(
        [
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--max-time",
            str(int(max_time)),
            "-w",
            "%{http_code} %{size_download} %{time_total} %{time_starttransfer}",
            url,
        ],
        capture_output=True,
        timeout=max_time + 30,
        check=False,
        text=True,
    )
    parts = res.stdout.split()
    if len(parts) != 4:
        raise ClientError(f"curl {url}: exit {res.returncode}, output {res.stdout!r}")
    out = CurlResult(int(parts[0]), int(parts[1]), float(parts[2]), float(parts[3]))
    if res.returncode != 0 or out.status != 200:
        raise ClientError(f"curl {url}: exit {res.returncode}, status {out.status}")
    return out


@dataclass
class TtfbResult:
    median_ms: float
    p90_ms: float
    max_ms: float
    n: int
    new_connections: int
    bad: int


def curl_ttfb(url: str, n: int) -> TtfbResult:
    """``n`` sequential GETs in one curl process (one kept-alive connection);
    ``time_starttransfer`` per request."""
    argv = [
        "curl",
        "-s",
        "--max-time",
        "120",
        "-w",
        "%{http_code} %{time_starttransfer} %{num_connects}\\n",
    ]
    for _ in range(n):
        argv += ["-o", "/dev/null", url]
    res = subprocess.run(argv, capture_output=True, timeout=150, check=False, text=True)
    times: list[float] = []
    connects = bad = 0
    for line in res.stdout.splitlines():
        parts = line.split()
        if len(parts) != 3:
            continue
        if parts[0] != "200":
            bad += 1
        times.append(float(parts[1]) * 1000)
        connects += int(parts[2])
    if not times:
        raise ClientError(f"curl ttfb {url}: exit {res.returncode}, no output")
    times.sort()
    return TtfbResult(
        median_ms=statistics.median(times),
        p90_ms=times[min(len(times) - 1, int(len(times) * 0.9))],
        max_ms=times[-1],
        n=len(times),
        new_connections=connects,
        bad=bad + (n - len(times)),
    )


@dataclass
class LoadResult:
    tool: str
    rps: float
    requests: int
    non2xx: int
    errors: int
    p50_ms: float | None = None
    p99_ms: float | None = None
    detail: dict[str, int] = field(default_factory=dict)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _latency_ms(text: str, pct: str) -> float | None:
    m = re.search(rf"^\s*{pct}%\s+([\d.]+)(us|ms|s|m)\s*$", text, re.M)
    return float(m.group(1)) * _UNIT_MS[m.group(2)] if m else None


def run_wrk(url: str, threads: int, conns: int, seconds: int) -> LoadResult:
    res = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{conns}", f"-d{seconds}s", "--latency", "--timeout", "5s", url],
        capture_output=True,
        timeout=seconds + 60,
        check=False,
        text=True,
    )
    out = res.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    if res.returncode != 0 or not m or not n:
        raise ClientError(f"wrk failed (exit {res.returncode}): {out[-500:]} {res.stderr[-500:]}")
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    detail: dict[str, int] = {}
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if se:
        detail = dict(
            zip(("connect", "read", "write", "timeout"), map(int, se.groups()), strict=True)
        )
    return LoadResult(
        tool=f"wrk -t{threads} -c{conns} -d{seconds}s",
        rps=float(m.group(1)),
        requests=int(n.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        errors=sum(detail.values()),
        p50_ms=_latency_ms(out, "50"),
        p99_ms=_latency_ms(out, "99"),
        detail=detail,
    )


async def _aiohttp_load(url: str, conns: int, seconds: float) -> LoadResult:
    import aiohttp

    ok = non2xx = errors = 0
    lat: list[float] = []
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=conns, force_close=False)
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal ok, non2xx, errors
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                        if 200 <= resp.status < 400:
                            ok += 1
                        else:
                            non2xx += 1
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    await asyncio.sleep(0.01)
                lat.append((time.perf_counter() - t0) * 1000)

        t0 = time.monotonic()
        await asyncio.wait_for(
            asyncio.gather(*(worker() for _ in range(conns))), timeout=seconds + 30
        )
        elapsed = time.monotonic() - t0
    lat.sort()
    total = ok + non2xx
    return LoadResult(
        tool=f"aiohttp load generator, {conns} conns, {seconds:g}s",
        rps=total / elapsed if elapsed > 0 else 0.0,
        requests=total,
        non2xx=non2xx,
        errors=errors,
        p50_ms=lat[len(lat) // 2] if lat else None,
        p99_ms=lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else None,
    )


def run_load(url: str, conns: int, seconds: int) -> LoadResult:
    """wrk -t2 when installed, else the (much weaker) in-process aiohttp generator."""
    if have("wrk"):
        return run_wrk(url, 2, conns, seconds)
    return asyncio.run(_aiohttp_load(url, conns, float(seconds)))
