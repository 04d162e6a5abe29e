"""Linux /proc readers: process trees, CPU time, RSS, open fds, and a background RSS sampler."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

CLK_TCK = os.sysconf("SC_CLK_TCK")
KIB = 1024
MIB = 1024 * 1024


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the ``(comm)`` field (index 0 is ``state``)."""
    raw = _read(f"/proc/{pid}/stat")
    if raw is None:
        return None
    end = raw.rfind(")")
    if end < 0:
        return None
    return raw[end + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (scans /proc for parent ids)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat_fields(int(name))
        if fields is None:
            continue
        parents.setdefault(int(fields[1]), []).append(int(name))
    out: list[int] = []
    todo = [root]
    while todo:
        pid = todo.pop()
        if pid in out:
            continue
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime+stime+cutime+cstime summed over ``pids`` (seconds)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # stat fields 14..17 (1-based) are utime, stime, cutime, cstime; here offset by 3.
        ticks += sum(int(x) for x in fields[11:15])
    return ticks / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """A ``kB`` value from /proc/<pid>/status (``VmRSS``, ``VmHWM``...), 0 if unavailable."""
    raw = _read(f"/proc/{pid}/status")
    if raw is None:
        return 0
    for line in raw.splitlines():
        if line.startswith(key + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1])
    return 0


def rss_kib(pids: list[int]) -> int:
    return sum(status_kib(pid, "VmRSS") for pid in pids)


def hwm_kib(pids: list[int]) -> int:
    return sum(status_kib(pid, "VmHWM") for pid in pids)


def open_fds(pids: list[int]) -> tuple[int, int]:
    """(open fds, of which sockets) summed over ``pids``."""
    total = sockets = 0
    for pid in pids:
        base = f"/proc/{pid}/fd"
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            total += 1
            try:
                if os.readlink(f"{base}/{name}").startswith("socket:"):
                    sockets += 1
            except OSError:
                pass
    return total, sockets


@dataclass
class RssSampler:
    """Samples summed VmRSS of a fixed set of pids every ``interval`` seconds in a thread."""

    pids: list[int]
    interval: float = 0.010
    max_seconds: float = 900.0
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> RssSampler:
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.samples.append((time.monotonic(), rss_kib(self.pids)))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def peak_kib(self, since: float = 0.0, until: float = float("inf")) -> int:
        values = [kib for t, kib in self.samples if since <= t <= until]
        return max(values, default=0)

    def __enter__(self) -> RssSampler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
