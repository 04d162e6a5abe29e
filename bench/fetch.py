"""``python -m bench.fetch``: `relay fetch` of one big file from a local origin, two trees compared.

    python -m bench.fetch --before DIR          # this tree against the relay tree at DIR
    python -m bench.fetch --rounds 7 --size 256m --dir /var/tmp

The origin is the main bench's (`bench.servers.start_origin`): nginx serving tmpfs files when
nginx is installed, else `python -m tests.origin` (which then shares the CPU and may be the
bottleneck). Each round runs, for each tree in turn (the order alternates between rounds, so
both see the same machine load), `python -m relay fetch URL -o DIR/relay-fetch.bin --sha256 HEX
--force --quiet` with PYTHONPATH set to that tree, then removes the file. Reported per tree:
median wall seconds (min-max), GB/s of the median, and median (and least) CPU seconds of the
fetch process (user + system, from the kernel's accounting of the finished child; on a busy
machine the least is the steadier figure). The output goes to tmpfs by default so the disk's
write-back speed does not dominate; `--dir` measures on a disk.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import raise_interrupt
from bench.servers import DATA_DIR, REPO, SIZES, ensure_data, nginx_path, start_origin


@dataclass
class Runs:
    tree: Path
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def fetch_once(tree: Path, url: str, out: Path, sha256: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one `relay fetch` run from `tree`."""
    argv = [sys.executable, "-m", "relay", "fetch", url, "-o", str(out), "--sha256", sha256]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    proc = subprocess.run(
        [*argv, "--force", "--quiet"], env=env, cwd=tree, capture_output=True, timeout=600
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"relay fetch from {tree} exited {proc.returncode}: {proc.stderr!r}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def expected_sha256(name: str, use_nginx: bool) -> str:
    if use_nginx:
        digest = hashlib.sha256()
        with open(DATA_DIR / name, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()
    from tests.origin import expected_sha256 as generated

    return generated(SIZES[name])


def report(runs: list[Runs], size: int, origin: str, rounds: int) -> str:
    lines = [
        f"relay fetch of {size / 2**30:.2f} GiB from {origin}, {rounds} rounds, order alternating",
        "",
        "| tree | wall s, median (min-max) | GB/s | CPU s, median (min) |",
        "|---|---|---|---|",
    ]
    for r in runs:
        wall = statistics.median(r.wall)
        lines.append(
            f"| {r.tree} | {wall:.2f} ({min(r.wall):.2f}-{max(r.wall):.2f}) "
            f"| {size / wall / 1e9:.2f} | {statistics.median(r.cpu):.2f} ({min(r.cpu):.2f}) |"
        )
    if len(runs) == 2:
        ratio = statistics.median(runs[0].wall) / statistics.median(runs[1].wall)
        lines += ["", f"wall time, {runs[0].tree.name} / {runs[1].tree.name}: {ratio:.2f}"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fetch", description=__doc__)
    parser.add_argument("--before", type=Path, help="another relay tree to compare with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", choices=["256m", "1g"], default="1g")
    parser.add_argument("--dir", type=Path, default=Path("/dev/shm"), help="where files go")
    args = parser.parse_args(argv)
    use_nginx = nginx_path() is not None
    if use_nginx:
        ensure_data([args.size, "1k"])
    trees = [REPO] + ([args.before.resolve()] if args.before else [])
    runs = [Runs(tree) for tree in trees]
    signal.signal(signal.SIGTERM, raise_interrupt)
    with tempfile.TemporaryDirectory(prefix="relay-bench-fetch-") as tmp:
        log_dir = Path(tmp)
        origin = start_origin(log_dir, log_dir, use_nginx)
        out = args.dir / f"relay-fetch-{os.getpid()}.bin"
        try:
            url = f"http://127.0.0.1:{origin.server.port}{origin.path(args.size)}"
            sha256 = expected_sha256(args.size, use_nginx)
            for n in range(args.rounds):
                order = runs if n % 2 == 0 else runs[::-1]
                for r in order:
                    wall, cpu = fetch_once(r.tree, url, out, sha256)
                    r.wall.append(wall)
                    r.cpu.append(cpu)
                    print(f"round {n + 1}: {r.tree}: {wall:.2f} s, {cpu:.2f} CPU s", flush=True)
        finally:
            origin.server.stop()
            for leftover in (out, Path(f"{out}.part"), Path(f"{out}.part.json")):
                leftover.unlink(missing_ok=True)
    print()
    print(report(runs, SIZES[args.size], origin.kind, args.rounds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
