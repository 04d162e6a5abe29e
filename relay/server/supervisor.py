"""`workers = N`: a supervisor process and N worker processes serving one port.

The supervisor binds the listening socket once and hands it to every worker (spawned, not
forked: each starts a fresh interpreter with its own event loop). The kernel then queues every
connection on that one socket and whichever worker is free accepts it. Measured against
`SO_REUSEPORT` (one socket per worker, connections hashed to a worker by address and port):
see docs/operations.md#workers for the figures and why one shared socket was chosen.

What the supervisor does:
- makes the run directory (mode 0700, removed at exit): the shared stream slots
  (`relay.proxy.shared_admission`), the server state below, the metrics files
  (`PROMETHEUS_MULTIPROC_DIR`), each worker's peer socket (`relay.net.peers`);
- holds `data_dir`'s lock for the whole server (its workers share the job store);
- starts the workers and waits until each says it is up. One that fails to start (its
  lifespan refused, say) stops the server: the reason is printed once and relay exits 1;
- restarts a worker that dies later, after a backoff (0.1 s, doubling, at most 10 s; reset once
  a worker has stayed up 30 s), giving back its stream slots and marking its metrics dead. A
  worker that keeps dying (10 restarts without staying up) stops the server (exit 1);
- on SIGTERM or SIGINT: the server is not ready at once (every worker's /readyz), and the
  signal goes to every worker, which drains exactly as a single relay does; it exits 0 once
  all have exited cleanly. A second Ctrl-C is forwarded too (skipping the drain).

Workers run in their own process group, so a terminal's Ctrl-C reaches the supervisor only
(and is forwarded once), and each leaves if the supervisor disappears (its parent changes).

/readyz on any worker speaks for the server: not ready while draining or while fewer than N
workers are up (a restart in progress).
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from relay.config import Config, WorkerInfo
from relay.errors import StartupError
from relay.proxy.shared_admission import SLOTS_FILE, SlotTable

logger = logging.getLogger(__name__)

STATE_FILE = "server.state"
METRICS_DIR = "metrics"
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0
"""Seconds a worker must stay up for its restart backoff to start again from the first."""
MAX_RESTARTS = 10
"""Restarts of one worker in a row (each dying within STABLE_AFTER) before relay gives up."""
_UP = 0
_DRAINING = 1


class ServerState:
    """Two numbers the supervisor writes and every worker reads: workers up, and draining."""

    def __init__(self, path: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(path, flags, 0o600)
        try:
            if os.fstat(fd).st_size < 16:
                os.ftruncate(fd, 16)
            self._map = mmap.mmap(fd, 16)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("q")

    def close(self) -> None:
        self._words.release()
        self._map.close()

    @property
    def up(self) -> int:
        return int(self._words[_UP])

    @up.setter
    def up(self, value: int) -> None:
        self._words[_UP] = value

    @property
    def draining(self) -> bool:
        return bool(self._words[_DRAINING])

    @draining.setter
    def draining(self, value: bool) -> None:
        self._words[_DRAINING] = int(value)


def server_readiness(worker: WorkerInfo) -> Callable[[], str | None]:
    """For a worker's /readyz: why the whole server is not ready, or None."""
    assert worker.run_dir is not None
    state = ServerState(worker.run_dir / STATE_FILE)

    def not_ready() -> str | None:
        if state.draining:
            return "draining"
        up = state.up
        if up < worker.count:
            return f"{up} of {worker.count} workers up"
        return None

    return not_ready


def listen(config: Config) -> socket.socket:
    """The server's listening socket, bound once for every worker."""
    family = socket.AF_INET6 if ":" in config.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((config.host, config.port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
        ) from None
    sock.set_inheritable(True)
    return sock


def worker_config(config: Config, index: int) -> Config:
    """The config one worker runs with: its even share of the upstream pool.

    `max_connections` is split (the first `max_connections % workers` workers get one more),
    so the server never opens more than `max_connections` upstream connections at once.
    """
    import dataclasses

    share, extra = divmod(config.max_connections, config.workers)
    return dataclasses.replace(config, max_connections=share + (1 if index < extra else 0))


@dataclass
class _Slot:
    """One worker index: its current process, status pipe and restart bookkeeping."""

    index: int
    process: BaseProcess | None = None
    status: Connection | None = None
    up: bool = False
    up_since: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    error: str | None = None
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    def __init__(self, config: Config, sock: socket.socket, run_dir: Path) -> None:
        self.config = config
        self.sock = sock
        self.run_dir = run_dir
        self.count = config.workers
        self.context = multiprocessing.get_context("spawn")
        self.slots = [_Slot(i) for i in range(self.count)]
        self.state = ServerState(run_dir / STATE_FILE)
        self.table = SlotTable(
            run_dir / SLOTS_FILE,
            workers=self.count,
            max_streams=config.max_streams,
            per_client=config.max_streams_per_client > 0,
        )
        self.stopping: int | None = None
        self.started_all = False
        self.failed: str | None = None

    # ---- processes ----------------------------------------------------------------------

    def _start(self, slot: _Slot) -> None:
        receive, send = self.context.Pipe(duplex=False)
        info = WorkerInfo(index=slot.index, count=self.count, run_dir=self.run_dir)
        process = self.context.Process(
            target=worker_main,
            args=(worker_config(self.config, slot.index), info, self.sock, send),
            name=f"relay-worker-{slot.index}",
        )
        process.start()
        send.close()
        slot.process, slot.status, slot.up, slot.restart_at = process, receive, False, None
        logger.info("worker %d started (pid %s)", slot.index, process.pid)

    def _reaped(self, slot: _Slot) -> None:
        process = slot.process
        assert process is not None
        process.join()
        code = process.exitcode if process.exitcode is not None else -1
        self._drain_status(slot)
        if slot.status is not None:
            slot.status.close()
        slot.process, slot.status = None, None
        self._mark_dead(process.pid)
        self.table.clear_worker(slot.index)
        if slot.up:
            slot.up = False
            self.state.up = self.state.up - 1
        if self.stopping is not None:
            slot.exit_codes.append(code)
            return
        if not self.started_all:
            self.failed = slot.error or (
                f"worker {slot.index} exited with code {code} while starting (see the log above)"
            )
            return
        lived = time.monotonic() - slot.up_since if slot.up_since else 0.0
        if lived >= STABLE_AFTER:
            slot.failures = 0
        slot.failures += 1
        if slot.failures > MAX_RESTARTS:
            self.failed = (
                f"worker {slot.index} keeps dying ({MAX_RESTARTS} restarts without staying up "
                f"{STABLE_AFTER:g}s; last exit code {code})"
            )
            return
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (slot.failures - 1))
        slot.restart_at = time.monotonic() + delay
        slot.up_since = 0.0
        logger.warning(
            "worker %d (pid %s) exited with code %d; restarting it in %.1fs",
            slot.index,
            process.pid,
            code,
            delay,
        )

    def _mark_dead(self, pid: int | None) -> None:
        if pid is None:
            return
        from prometheus_client import multiprocess

        with contextlib.suppress(OSError):
            multiprocess.mark_process_dead(pid, str(self.run_dir / METRICS_DIR))  # type: ignore[no-untyped-call]

    def _drain_status(self, slot: _Slot) -> None:
        status = slot.status
        while status is not None:
            try:
                if not status.poll():
                    return
                kind, detail = status.recv()
            except (EOFError, OSError):
                return
            if kind == "up" and not slot.up:
                slot.up, slot.up_since = True, time.monotonic()
                self.state.up = self.state.up + 1
                if not self.started_all and all(s.up for s in self.slots):
                    self.started_all = True
                    logger.info("all %d workers up", self.count)
            elif kind == "failed":
                slot.error = str(detail)

    # ---- the loop -----------------------------------------------------------------------

    def run(self) -> int:
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        os.set_blocking(wake_read, False)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        originals = {
            sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for slot in self.slots:
                self._start(slot)
            self._loop(wake_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in originals.items():
                signal.signal(sig, handler)
            os.close(wake_read)
            os.close(wake_write)
            self._stop_all(signal.SIGKILL)
            self.state.close()
            self.table.close()
        if self.failed is not None:
            if not self.started_all:
                raise StartupError(self.failed)
            logger.error("stopping: %s", self.failed)
            return 1
        clean = all(code == 0 for s in self.slots for code in s.exit_codes)
        return 0 if clean else 1

    def _loop(self, wake_read: int) -> None:
        while True:
            live = [s for s in self.slots if s.process is not None]
            if self.failed is not None:
                self._fail(live)
                return
            if self.stopping is not None and not live:
                return
            now = time.monotonic()
            pending = [s for s in self.slots if s.restart_at is not None]
            for slot in pending:
                assert slot.restart_at is not None
                if slot.restart_at <= now and self.stopping is None:
                    self._start(slot)
            timeout = min((s.restart_at - now for s in pending if s.restart_at), default=None)
            waitables: list[Any] = [wake_read]
            for slot in self.slots:
                if slot.process is not None:
                    waitables.append(slot.process.sentinel)
                    if slot.status is not None:
                        waitables.append(slot.status)
            ready = wait(waitables, timeout=max(0.0, timeout) if timeout is not None else None)
            if wake_read in ready:
                self._signals(wake_read)
            for slot in self.slots:
                if slot.status is not None and slot.status in ready:
                    self._drain_status(slot)
                process = slot.process
                if process is not None and process.sentinel in ready:
                    self._reaped(slot)

    def _signals(self, wake_read: int) -> None:
        try:
            received = os.read(wake_read, 64)
        except BlockingIOError:
            return
        for number in received:
            sig = signal.Signals(number)
            if self.stopping is None:
                self.stopping = sig
                self.state.draining = True
                for slot in self.slots:
                    slot.restart_at = None
                logger.info("%s: stopping %d workers", sig.name, self.count)
                self._stop_all(signal.SIGTERM)
            elif sig == signal.SIGINT:
                logger.info("second SIGINT: workers skip the drain")
                self._stop_all(signal.SIGINT)

    def _stop_all(self, sig: int) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid is not None and process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)
        if sig == signal.SIGKILL:
            for slot in self.slots:
                if slot.process is not None:
                    slot.process.join(5)

    def _fail(self, live: list[_Slot]) -> None:
        """Stop the workers still running (one failed to start, or keeps dying)."""
        self.state.draining = True
        self._stop_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.drain_timeout + self.config.shutdown_delay + 5
        for slot in live:
            process = slot.process
            if process is not None:
                process.join(max(0.0, deadline - time.monotonic()))


def supervise(config: Config) -> int:
    """Run `config.workers` workers until stopped; the exit code. StartupError if they could
    not start (printed once by the CLI)."""
    from relay.downloads import DataDirLock

    run_dir = Path(tempfile.mkdtemp(prefix="relay-run-"))
    lock = None
    sock: socket.socket | None = None
    try:
        if config.data_dir:
            lock = DataDirLock.acquire(Path(config.data_dir))
        sock = listen(config)
        (run_dir / METRICS_DIR).mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(run_dir / METRICS_DIR)
        SlotTable.create(
            run_dir,
            workers=config.workers,
            max_streams=config.max_streams,
            per_client=config.max_streams_per_client > 0,
        )
        ServerState(run_dir / STATE_FILE).close()
        logger.info(
            "relay listening on %s:%d with %d workers", config.host, config.port, config.workers
        )
        return Supervisor(config, sock, run_dir).run()
    finally:
        os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        if sock is not None:
            sock.close()
        if lock is not None:
            lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)


def worker_main(
    config: Config, worker: WorkerInfo, sock: socket.socket, status: Connection
) -> None:
    """A worker process: today's server on the shared socket and its peer socket."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor, which forwards it
    from relay.server.run import serve_worker

    code = serve_worker(config, worker, sock, status)
    status.close()
    raise SystemExit(code)
