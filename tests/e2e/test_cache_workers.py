"""One cache across worker processes: `relay serve` with `workers = 2` (a real supervisor and
two worker processes on one cache_dir). Each worker is reached on its own through its peer
socket (the same app as on the public port), so a test chooses which worker a client asks."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_process import RelayProcess
from tests.harness import wait_until
from tests.loopback import LoopbackServer
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
ADMIN = {"x-relay-admin-token": "sesame"}


class Workers(RelayProcess):
    """`relay serve` with `workers = 2`; its run directory under a short TMPDIR of its own
    (peer socket paths must stay under the Unix limit)."""

    def __init__(self, origin: Origin, tmp_path: Path, **settings: object) -> None:
        super().__init__(origin, tmp_path, workers=2, admin_token="sesame", **settings)
        self.tmp = Path(tempfile.mkdtemp(prefix="rw", dir="/tmp"))
        self.cache = tmp_path / "cache"

    def start(self) -> Workers:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        env["TMPDIR"] = str(self.tmp)
        LoopbackServer.started()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "relay", "serve", "--config", str(self.config)),
                    *("--port", str(self.port), "--host", "127.0.0.1"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            assert wait_until(self._healthy, timeout=30), self.log.read_text()
            assert wait_until(lambda: self.up(0) and self.up(1), timeout=30), self.log.read_text()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def socket(self, index: int) -> Path | None:
        found = sorted(self.tmp.glob(f"relay-run-*/worker-{index}.sock"))
        return found[0] if found else None

    def client(self, index: int, timeout: float = 60) -> httpx.Client:
        """A client of worker `index` only."""
        path = self.socket(index)
        assert path is not None, f"worker {index} has no peer socket"
        return httpx.Client(
            transport=httpx.HTTPTransport(uds=str(path)), base_url="http://relay", timeout=timeout
        )

    def up(self, index: int) -> bool:
        """Whether worker `index` answers /healthz on its peer socket (a plain socket: the
        socket file of a killed worker refuses connections until its successor binds it)."""
        path = self.socket(index)
        if path is None:
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(2)
            try:
                sock.connect(str(path))
                sock.sendall(b"GET /healthz HTTP/1.0\r\nHost: relay\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
            except OSError:
                return False

    def get(self, index: int, path: str) -> httpx.Response:
        with self.client(index) as client:
            return client.get(path)

    def size_metric(self, index: int) -> int:
        """relay_cache_size_bytes as worker `index` alone reports it."""
        with self.client(index) as client:
            families = client.get("/metrics").json()  # a peer asks for its own values
        (value,) = [
            sample[2]
            for family in families
            for sample in family["samples"]
            if sample[0] == "relay_cache_size_bytes"
        ]
        return int(value)

    def leader_pid(self) -> int | None:
        """The process holding the fill lock of the one fill running (from /proc/locks)."""
        inodes = {p.stat().st_ino for p in (self.cache / "workers" / "fills").glob("*.lock")}
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and int(parts[5].split(":")[2]) in inodes:
                return int(parts[4])
        return None


@pytest.fixture
def workers(origin: Origin, tmp_path: Path) -> Iterator[Workers]:
    origin.reset_stats()  # the origin is the session's: count this test's requests only
    relay = Workers(
        origin,
        tmp_path,
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=512 * MiB,
        drain_timeout=1,
        shutdown_delay=0,
    ).start()
    try:
        yield relay
    finally:
        relay.stop()


@dataclass
class Reader:
    """A client reading a whole body through one worker, in a thread."""

    relay: Workers
    index: int
    path: str
    received: int = 0
    digest: str = ""
    status: int = 0
    error: str | None = None
    complete: bool = False
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sha = hashlib.sha256()
        try:
            with self.relay.client(self.index) as client, client.stream("GET", self.path) as r:
                self.status = r.status_code
                for chunk in r.iter_raw():
                    sha.update(chunk)
                    self.received += len(chunk)
            self.complete = True
        except httpx.HTTPError as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.digest = sha.hexdigest()

    def join(self) -> None:
        self.thread.join(60)
        assert not self.thread.is_alive()


def _gets(origin: Origin, path: str) -> int:
    """GETs of the relayed `path` (under /o/) the origin received."""
    target = path.removeprefix("/o")
    return sum(1 for r in origin.requests if r.method == "GET" and r.target == target)


def test_cold_object_costs_the_origin_one_get_across_both_workers_and_streams_from_the_first_byte(
    workers: Workers, origin: Origin
) -> None:
    """Six clients, three on each worker, ask for a cold 4 MiB object while the origin holds
    its body after 1 MiB: the upstream is asked once, every client (the other worker's
    included) already has bytes while the origin holds the rest, and every body is exact."""
    origin.close_gate("cw")
    path = "/o/gen/4m?v=701&pause_after=1m&gate=cw"
    first = Reader(workers, 0, path)
    assert origin.wait_for(lambda o: _gets(o, path) == 1, timeout=20)
    readers = [first] + [Reader(workers, i % 2, path) for i in range(1, 6)]
    try:
        # Every client streams while the origin holds the body mid-way: the readers of the
        # other worker read the leader's partial file from its first byte.
        streaming = wait_until(lambda: all(r.received >= 64 * 1024 for r in readers), timeout=30)
        assert streaming, [(r.received, r.status, r.error) for r in readers]
        assert all(r.received < 4 * MiB for r in readers)
    finally:
        origin.open_gate("cw")
    for r in readers:
        r.join()
    want = expected_sha256(4 * MiB)
    assert [(r.status, r.complete, r.digest) for r in readers] == [(200, True, want)] * 6
    assert _gets(origin, path) == 1
    assert origin.body_bytes <= 1.1 * 4 * MiB
    # Stored once: both workers now answer it as a hit.
    for index in (0, 1):
        hit = workers.get(index, path)
        assert hit.headers["cache-status"].startswith("relay; hit")
        assert hashlib.sha256(hit.content).hexdigest() == want
    assert _gets(origin, path) == 1


def test_purge_and_eviction_are_seen_by_every_worker(origin: Origin, tmp_path: Path) -> None:
    """An object stored through one worker is a hit on the other; purged through the public
    port, it is a miss on both; with a small budget, objects stored through both workers
    evict each other least recently used first, both workers report one disk use, and the
    files on disk stay within cache_max_bytes."""
    budget = 8 * MiB
    origin.reset_stats()
    with contextlib.ExitStack() as stack:
        relay = Workers(
            origin,
            tmp_path,
            cache_dir=str(tmp_path / "cache"),
            cache_max_bytes=budget,
            drain_timeout=1,
            shutdown_delay=0,
        ).start()
        stack.callback(relay.stop)
        path = "/o/gen/256k?v=702"
        assert relay.get(0, path).headers["cache-status"] == "relay; fwd=miss"
        assert relay.get(1, path).headers["cache-status"].startswith("relay; hit")
        assert _gets(origin, path) == 1
        purged = httpx.delete(f"{relay.url}/cache{path}", headers=ADMIN)
        assert purged.json() == {"purged": 1}
        # Purged for both: the worker that stored it fetches it again, then the other hits.
        assert relay.get(0, path).headers["cache-status"] == "relay; fwd=miss"
        assert relay.get(1, path).headers["cache-status"].startswith("relay; hit")
        assert _gets(origin, path) == 2

        # Eviction across workers: 1 MiB objects stored alternately through both workers.
        for n in range(12):
            r = relay.get(n % 2, f"/o/gen/1m?v={800 + n}")
            assert r.status_code == 200
            assert len(r.content) == MiB
        sizes = {relay.size_metric(0), relay.size_metric(1)}
        assert len(sizes) == 1, sizes
        (size,) = sizes
        assert size <= budget
        on_disk = _disk_use(relay.cache)
        assert on_disk <= budget, (on_disk, size)
        # The oldest objects went, whichever worker stored them; the newest stay, for both.
        gets = _gets(origin, "/o/gen/1m?v=800")
        assert relay.get(1, "/o/gen/1m?v=800").headers["cache-status"] == "relay; fwd=miss"
        assert _gets(origin, "/o/gen/1m?v=800") == gets + 1
        for index in (0, 1):
            assert (
                relay.get(index, "/o/gen/1m?v=811").headers["cache-status"].startswith("relay; hit")
            )


def _disk_use(root: Path) -> int:
    """What cache_dir takes on disk: every file and directory under it, as the disk counts."""
    total = os.lstat(root).st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def test_a_worker_killed_mid_fill_aborts_the_other_workers_readers_and_restarts_with_the_cache(
    workers: Workers, origin: Origin
) -> None:
    """The worker leading a fill is killed (SIGKILL) while the origin holds the body: the
    client reading that fill through the other worker is aborted (never a clean short body),
    the next request fills again, and the restarted worker serves as hits the objects stored
    before the kill."""
    stored = "/o/gen/512k?v=703"
    assert workers.get(0, stored).headers["cache-status"] == "relay; fwd=miss"
    origin.close_gate("kill")
    path = "/o/gen/4m?v=704&pause_after=1m&gate=kill"
    leader = Reader(workers, 0, path)
    assert origin.wait_for(lambda o: _gets(o, path) == 1, timeout=20)
    follower = Reader(workers, 1, path)
    try:
        assert wait_until(lambda: follower.received >= 64 * 1024, timeout=30)
        pid = workers.leader_pid()
        assert pid is not None
        assert workers.proc is not None
        assert pid != workers.proc.pid
        os.kill(pid, signal.SIGKILL)
        follower.join()
        leader.join()
    finally:
        origin.open_gate("kill")
    assert follower.error is not None, follower
    assert not follower.complete
    assert follower.received < 4 * MiB
    # The next request fills again, from the origin, whole and exact.
    again = workers.get(1, path)
    assert again.status_code == 200
    assert hashlib.sha256(again.content).hexdigest() == expected_sha256(4 * MiB)
    assert _gets(origin, path) == 2
    # The killed leader's partial file and head were removed by the next leader of the key.
    leftovers = [
        p.name
        for p in (workers.cache / "objects").rglob("*.*")
        if p.suffix in (".partial", ".head")
    ]
    assert leftovers == []
    # The supervisor restarted the killed worker: it serves what was stored as hits.
    assert wait_until(lambda: workers.up(0), timeout=30)
    for index in (0, 1):
        hit = workers.get(index, stored)
        assert hit.headers["cache-status"].startswith("relay; hit"), hit.headers
    assert workers.get(0, path).headers["cache-status"].startswith("relay; hit")
    assert _gets(origin, stored) == 1


def test_a_purge_reaches_the_fills_running_in_every_worker(
    workers: Workers, origin: Origin
) -> None:
    """Each worker fills an object (the origin holds both bodies); one purge of both through
    the public port (whichever worker takes it, the other's fill is in the other worker, so
    the purge must be passed on) reaches both fills: their clients still get the whole
    bodies, nothing is stored, and the next requests fetch them again."""
    origin.close_gate("pp")
    paths = [f"/o/gen/2m?v={710 + index}&pause_after=512k&gate=pp" for index in (0, 1)]
    readers = [Reader(workers, index, path) for index, path in enumerate(paths)]
    try:
        assert origin.wait_for(lambda o: all(_gets(o, p) == 1 for p in paths), timeout=20)
        assert wait_until(lambda: all(r.received > 0 for r in readers), timeout=30)
        purged = httpx.post(
            f"{workers.url}/cache/purge", json={"prefix": "/o/gen/"}, headers=ADMIN, timeout=30
        )
        assert purged.json() == {"purged": 2}
    finally:
        origin.open_gate("pp")
    for reader in readers:
        reader.join()
        assert reader.complete
        assert reader.digest == expected_sha256(2 * MiB)
    for index, path in enumerate(paths):
        assert workers.get(1 - index, path).headers["cache-status"] == "relay; fwd=miss"
        assert _gets(origin, path) == 2
