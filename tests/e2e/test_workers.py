"""End to end with `relay serve --workers 2`: a supervisor and two worker processes on one port.

Which worker answered is read from the JSON access log (its `worker` field), never from a
header clients see. Requests are spread over fresh connections until both workers have
answered (bounded): the kernel hands each connection to whichever worker accepts it first.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import wait_until
from tests.loopback import LoopbackServer
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Workers(LoopbackServer):
    """`python -m relay serve --workers N` with a TOML config, logging JSON to a file."""

    def __init__(
        self, origin: Origin, tmp_path: Path, *, workers: int = 2, **settings: Any
    ) -> None:
        self.port = free_port()
        values = {"workers": workers, "log_format": "json", **settings}
        lines = [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines += ["[[routes]]", 'prefix = "/o/"', f'upstream = "{origin.url}/"']
        lines += ["allow_private = true"]
        self.config = tmp_path / "relay.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.count = workers
        self.tmp = tmp_path / "tmp"  # where the supervisor makes its run directory
        self.tmp.mkdir(exist_ok=True)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        return {**env, "TMPDIR": str(self.tmp)}

    def command(self) -> list[str]:
        return [
            sys.executable,
            *("-m", "relay", "serve", "--config", str(self.config)),
            *("--port", str(self.port), "--host", "127.0.0.1"),
        ]

    def start(self, *, ready: bool = True) -> Workers:
        LoopbackServer.started()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env()
            )
        if ready:
            assert wait_until(self.ready, timeout=30), self.log.read_text()
        return self

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            self.proc.send_signal(signal.SIGINT)  # the second one skips the drain
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def records(self) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def answered_by(self, request_id: str) -> int | None:
        """The worker whose access record carries `request_id`."""
        for record in self.records():
            if record.get("logger") == "relay.access" and record.get("request_id") == request_id:
                worker = record.get("worker")
                return worker if isinstance(worker, int) else None
        return None

    def worker_pids(self) -> list[int]:
        """The supervisor's worker processes (not multiprocessing's resource tracker)."""
        assert self.proc is not None
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"spawn_main" in cmdline:
                pids.append(int(entry.name))
        return sorted(pids)


MakeWorkers = Callable[..., Workers]
"""make_workers(**settings): a Workers (not started) stopped after the test."""


@pytest.fixture
def make_workers(origin: Origin, tmp_path: Path) -> Iterator[MakeWorkers]:
    started: list[Workers] = []

    def make(**settings: Any) -> Workers:
        relay = Workers(origin, tmp_path, **settings)
        started.append(relay)
        return relay

    yield make
    for relay in started:
        relay.stop()


def get(url: str, **kwargs: object) -> httpx.Response:
    """One request on a fresh connection (so that any worker may accept it)."""
    with httpx.Client(timeout=30) as client:
        return client.get(url, **kwargs)  # type: ignore[arg-type]


def spread(relay: Workers, path: str, *, limit: int = 400) -> dict[int, int]:
    """GET `path` on fresh connections until every worker has answered one; the requests each
    worker answered (the request id identifies them in the access log)."""
    by_worker: dict[int, int] = {}
    ids = []
    for n in range(limit):
        response = get(f"{relay.url}{path}")
        assert response.status_code == 200, response.text
        ids.append(response.headers["x-request-id"])
        if n % 10 == 9 or n == limit - 1:
            assert wait_until(lambda: relay.answered_by(ids[-1]) is not None, timeout=10)
            by_worker = {}
            for request_id in ids:
                worker = relay.answered_by(request_id)
                assert worker is not None
                by_worker[worker] = by_worker.get(worker, 0) + 1
            if len(by_worker) == relay.count:
                return by_worker
    return by_worker


def answering_worker(relay: Workers, response: httpx.Response) -> int:
    request_id = response.headers["x-request-id"]
    assert wait_until(lambda: relay.answered_by(request_id) is not None, timeout=10)
    worker = relay.answered_by(request_id)
    assert worker is not None
    return worker


def scrape(relay: Workers) -> dict[str, float]:
    text = get(f"{relay.url}/metrics").text
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


class Held:
    """Requests sent on raw sockets whose upstream answer the origin holds (`hold=<gate>`):
    each holds a stream slot in whichever worker accepted it until the gate opens."""

    def __init__(self, relay: Workers, origin: Origin, gate: str) -> None:
        self.relay, self.origin, self.gate = relay, origin, gate
        self.socks: list[socket.socket] = []
        origin.close_gate(gate)

    def open(self, n: int, *, client: str | None = None) -> None:
        before = self.upstream_requests()
        for i in range(n):
            sock = socket.create_connection(("127.0.0.1", self.relay.port))
            path = f"/o/gen/1k?hold={self.gate}&n={len(self.socks)}"
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
            self.socks.append(sock)
            del i
        # Admitted: each reached the origin (holding its slot meanwhile).
        assert wait_until(lambda: self.upstream_requests() == before + n, timeout=10)

    def upstream_requests(self) -> int:
        return sum(1 for r in self.origin.requests if f"hold={self.gate}&" in r.target)

    def release(self) -> list[bytes]:
        self.origin.open_gate(self.gate)
        answers = []
        for sock in self.socks:
            sock.settimeout(10)
            data = b""
            try:
                while not data.endswith(b"\r\n\r\n") and b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                pass
            answers.append(data.split(b"\r\n", 1)[0])
            sock.close()
        self.socks = []
        return answers


# ---- spreading, metrics ----------------------------------------------------------------------


def test_requests_reach_both_workers_and_one_scrape_sums_them(make_workers: MakeWorkers) -> None:
    relay = make_workers().start()
    by_worker = spread(relay, "/o/gen/1k")
    assert sorted(by_worker) == [0, 1], by_worker
    sent = sum(by_worker.values())
    metrics = scrape(relay)
    assert metrics['relay_requests_total{method="GET",route="/o/",status="200"}'] == sent
    body = metrics['relay_response_body_bytes_total{route="/o/"}']
    assert body == sent * 1024
    assert metrics["relay_scrape_peers_missing"] == 0
    # Limits are the server's, not multiplied by the workers.
    assert metrics["relay_max_streams"] == 1000
    assert metrics["relay_upstream_max_connections"] == 100
    # No per-worker detail reaches clients.
    response = get(f"{relay.url}/o/gen/1k")
    assert not [h for h in response.headers if "worker" in h.lower()]


# ---- global limits ---------------------------------------------------------------------------


def test_max_streams_holds_across_workers(make_workers: MakeWorkers, origin: Origin) -> None:
    """max_streams = 4 with 2 workers: 4 streams in flight, the 5th is refused with 503 at
    once by whichever worker it reaches, and the gauge of streams in flight sums both."""
    relay = make_workers(max_streams=4).start()
    held = Held(relay, origin, "slots")
    try:
        held.open(4)
        assert scrape(relay)['relay_active_streams{route="/o/"}'] == 4
        refused_by: set[int] = set()
        for _ in range(400):
            response = get(f"{relay.url}/o/gen/1k")
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            refused_by.add(answering_worker(relay, response))
            if refused_by == {0, 1}:
                break
        assert refused_by == {0, 1}
    finally:
        answers = held.release()
    assert answers == [b"HTTP/1.1 200 OK"] * 4
    assert wait_until(lambda: scrape(relay)['relay_active_streams{route="/o/"}'] == 0)
    assert get(f"{relay.url}/o/gen/1k").status_code == 200


def test_per_client_limit_holds_across_workers(make_workers: MakeWorkers, origin: Origin) -> None:
    relay = make_workers(max_streams_per_client=2).start()
    held = Held(relay, origin, "client")
    try:
        held.open(2)
        for _ in range(20):
            assert get(f"{relay.url}/o/gen/1k").status_code == 429
    finally:
        assert held.release() == [b"HTTP/1.1 200 OK"] * 2
    assert get(f"{relay.url}/o/gen/1k").status_code == 200


def test_a_killed_worker_is_restarted_and_its_slots_come_back(
    make_workers: MakeWorkers, origin: Origin
) -> None:
    """Both workers killed in turn while their clients hold every slot: each is restarted
    (/readyz is 503 until it is up), the held transfers are aborted, never answered, and the
    slots the dead held come back: two new streams are admitted, a third refused."""
    relay = make_workers(max_streams=2).start()
    held = Held(relay, origin, "kill")
    held.open(2)
    assert get(f"{relay.url}/o/gen/1k").status_code == 503
    for _ in range(2):
        old = set(relay.worker_pids())
        assert len(old) == 2
        os.kill(min(old), signal.SIGKILL)
        assert wait_until(lambda: len(set(relay.worker_pids()) - old) == 1, timeout=20)  # noqa: B023
        assert wait_until(relay.ready, timeout=20), relay.log.read_text()[-3000:]
    answers = held.release()
    assert answers == [b"", b""], answers  # cut by the kill: no status line, no short body
    again = Held(relay, origin, "after")
    try:
        again.open(2)
        assert get(f"{relay.url}/o/gen/1k").status_code == 503
    finally:
        assert again.release() == [b"HTTP/1.1 200 OK"] * 2
    log = relay.log.read_text()
    assert log.count("restarting it in") == 2


# ---- lifecycle --------------------------------------------------------------------------------


def test_sigterm_drains_every_worker_and_exits_zero(make_workers: MakeWorkers) -> None:
    relay = make_workers(drain_timeout=3, shutdown_delay=1).start()
    assert relay.proc is not None
    clients = [httpx.Client(timeout=30) for _ in range(6)]
    try:
        longs = [
            c.send(c.build_request("GET", f"{relay.url}/o/gen/100m?slow=1000000"), stream=True)
            for c in clients[:3]
        ]
        shorts = [
            c.send(c.build_request("GET", f"{relay.url}/o/gen/1m?slow=2000000"), stream=True)
            for c in clients[3:]
        ]
        relay.proc.send_signal(signal.SIGTERM)
        assert wait_until(
            lambda: httpx.get(f"{relay.url}/readyz", timeout=2).status_code == 503, timeout=5
        )
        assert httpx.get(f"{relay.url}/o/gen/10", timeout=5).status_code == 200
        for stream in shorts:
            assert len(b"".join(stream.iter_raw())) == 1024 * 1024
        for stream in longs:
            with pytest.raises(httpx.RemoteProtocolError):
                for _ in stream.iter_raw():
                    pass
        assert relay.proc.wait(30) == 0
    finally:
        for c in clients:
            c.close()
    assert not list(relay.tmp.iterdir())  # the run directory is removed
    log = relay.log.read_text()
    assert log.count("shutdown requested") == 2
    assert "Traceback" not in log


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("relay: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_a_port_in_use_stops_the_start_with_one_line(make_workers: MakeWorkers) -> None:
    relay = make_workers()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", relay.port))
        taken.listen(1)
        done = subprocess.run(
            relay.command(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=relay.env(),
        )
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert f"cannot listen on 127.0.0.1:{relay.port}" in line


def test_a_worker_that_cannot_start_stops_the_server_with_one_line(
    make_workers: MakeWorkers, tmp_path: Path
) -> None:
    """Every worker refuses a damaged job store; the reason is printed once, exit code 1."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "jobs.sqlite3").write_bytes(b"not a database" * 100)
    relay = make_workers(data_dir=str(data), downloads_open=True)
    done = subprocess.run(
        relay.command(), capture_output=True, text=True, timeout=60, check=False, env=relay.env()
    )
    assert done.returncode == 1
    line = one_error_line(done.stderr)
    assert "job store" in line, line
    assert not list(relay.tmp.iterdir())  # the run directory is removed


# ---- downloads to disk ------------------------------------------------------------------------


def test_a_download_runs_once_and_every_worker_answers_for_it(
    make_workers: MakeWorkers, origin: Origin, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    relay = make_workers(data_dir=str(data), downloads_open=True).start()
    size = 2 * 1024 * 1024
    order = {"path": f"/o/gen/{size}?slow=4000000", "name": "big.bin"}
    first = httpx.post(f"{relay.url}/downloads", json=order, timeout=10)
    assert first.status_code == 202, first.text
    job_id = first.json()["id"]
    # The same order through fresh connections (any worker): the same job.
    for _ in range(10):
        again = httpx.post(f"{relay.url}/downloads", json=order, timeout=10)
        assert again.json()["id"] == job_id
    answered: set[int] = set()

    def completed() -> bool:
        response = get(f"{relay.url}/downloads/{job_id}")
        answered.add(answering_worker(relay, response))
        return bool(response.json()["state"] == "completed" and answered == {0, 1})

    assert wait_until(completed, timeout=60), (answered, relay.log.read_text()[-2000:])
    fetched = [r for r in origin.requests if r.path.startswith(f"/gen/{size}")]
    assert len(fetched) == 1, [r.path for r in fetched]
    for _ in range(6):
        body = get(f"{relay.url}/files/big.bin").content
        assert hashlib.sha256(body).hexdigest() == expected_sha256(size)
    with sqlite3.connect(data / "jobs.sqlite3") as db:
        assert db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0] == 1


def test_a_dead_runners_download_is_resumed_by_another_worker(
    make_workers: MakeWorkers, origin: Origin, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    relay = make_workers(data_dir=str(data), downloads_open=True).start()
    size = 8 * 1024 * 1024
    order = {"path": f"/o/gen/{size}?slow=2000000", "name": "resumed.bin"}
    job_id = httpx.post(f"{relay.url}/downloads", json=order, timeout=10).json()["id"]

    def runner() -> int | None:
        for record in relay.records():
            if "now runs the downloads" in str(record.get("message")):
                worker = record.get("worker")
                return worker if isinstance(worker, int) else None
        return None

    assert wait_until(lambda: runner() is not None, timeout=10)

    def partial_bytes() -> int:
        return sum(p.stat().st_size for p in data.rglob("*.partial"))

    assert wait_until(lambda: partial_bytes() > 1024 * 1024, timeout=20)
    # The runner's pid, from the supervisor's line saying it started that worker.
    started = [
        str(r["message"])
        for r in relay.records()
        if str(r.get("message", "")).startswith(f"worker {runner()} started")
    ]
    pid = int(started[-1].split("pid ")[1].rstrip(")"))
    assert pid in relay.worker_pids()
    os.kill(pid, signal.SIGKILL)

    def state() -> str:
        return str(get(f"{relay.url}/downloads/{job_id}").json()["state"])

    assert wait_until(lambda: state() == "completed", timeout=60), relay.log.read_text()[-3000:]
    body = get(f"{relay.url}/files/resumed.bin").content
    assert hashlib.sha256(body).hexdigest() == expected_sha256(size)
    resumed = [r for r in origin.requests if r.path.startswith(f"/gen/{size}")]
    assert len(resumed) == 2
    assert resumed[1].header("range", "").startswith("bytes=")  # type: ignore[union-attr]
