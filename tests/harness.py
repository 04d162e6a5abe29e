"""Running a real relay under uvicorn on loopback, and the clients tests drive it with."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import itertools
import logging
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType
from typing import Any

import httpx
import uvicorn
from uvicorn.lifespan.on import LifespanOn
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from relay.cache.clock import Clock
from relay.config import Config, Route
from relay.errors import TransferAborted
from relay.net.transports import PooledTransport, PoolStats, make_transport
from relay.net.transports.aiohttp_transport import AiohttpTransport
from relay.proxy.admission import StreamLimiter
from relay.server.run import RelayServer, build_server, event_loop
from tests.loopback import LoopbackServer


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> bool:
    """Poll until predicate() is true; bounded, returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------------------------------
# Invariants: checked after every test that started a relay (tests/conftest.py), and by the
# fuzz tier after every example. A test that breaks one fails even if its own assertions pass.
# ---------------------------------------------------------------------------------------------


class InvariantViolation(AssertionError):
    """A relay was left holding something after a test (or a fuzz example)."""


@dataclasses.dataclass
class InvariantSettings:
    enabled: bool = True
    """Off for a test marked `leaves_resources` (set per test by tests/conftest.py)."""
    settle_timeout: float = 5.0
    """How long a check waits for slots, connections and tasks to be released."""


INVARIANTS = InvariantSettings()

# Relays started since the last `take_started_relays()`: the conftest hook checks each test's.
_started: list[RelayThread] = []


def take_started_relays() -> list[RelayThread]:
    taken = list(_started)
    _started.clear()
    return taken


# Tasks uvicorn itself keeps on the loop: the server, the lifespan and one per request in
# progress (a request still running is caught by the slot and connection counts). Told apart
# by the code object their coroutine runs, not by name.
_UVICORN_TASK_CODE: frozenset[CodeType] = frozenset(
    {
        uvicorn.Server.serve.__code__,
        LifespanOn.main.__code__,
        RequestResponseCycle.run_asgi.__code__,
    }
)


def _task_code(task: asyncio.Task[Any]) -> CodeType | None:
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None)
    return code if isinstance(code, CodeType) else None


# relay's own tasks that live as long as the app (started and cancelled by its lifespan) are
# named with this prefix; every other task must be gone once a test's requests are over.
SERVICE_TASK_PREFIX = "service: "


def _stray_tasks() -> list[str]:
    """Tasks on the running loop (run there) that are neither uvicorn's, relay's lifespan-long
    services' nor this check's."""
    current = asyncio.current_task()
    stray = []
    for task in asyncio.all_tasks():
        if task is current or task.done() or _task_code(task) in _UVICORN_TASK_CODE:
            continue
        if task.get_name().startswith(SERVICE_TASK_PREFIX):
            continue
        stray.append(repr(task.get_coro()))
    return sorted(stray)


# uvicorn's ERROR lines about the app itself, logged without a traceback: an app that raised,
# or that returned without starting or completing its response while its client was there (a
# client reset relay did not mark on the request's cycle is logged so, and truncates nothing:
# it is an error line an operator sees for an ordinary abort).
_UVICORN_APP_ERRORS = (
    "Exception in ASGI application",
    "ASGI callable returned without",
    "ASGI callable should return None",
)


class _ErrorCapture(logging.Handler):
    """Unhandled exceptions logged on one relay's thread: ERROR records carrying a traceback,
    and uvicorn's errors about the app (`_UVICORN_APP_ERRORS`). TransferAborted is relay
    aborting a client on purpose (raised so uvicorn drops the connection);
    relay.server.logs.QuietAborts drops those records in production, and so does this."""

    def __init__(self, thread_name: str) -> None:
        super().__init__(logging.ERROR)
        self.thread_name = thread_name
        self.records: list[logging.LogRecord] = []
        self.loop_errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        # asyncio's own reports ("Future exception was never retrieved", logged when the
        # future is collected, on whichever thread collects it) come through the loop's
        # exception handler instead (on_loop_exception), which knows their loop.
        if record.threadName != self.thread_name or record.name == "asyncio":
            return
        if record.exc_info and isinstance(record.exc_info[1], TransferAborted):
            return
        if record.exc_info or record.getMessage().startswith(_UVICORN_APP_ERRORS):
            self.records.append(record)

    def on_loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The relay loop's exception handler: record, then report as asyncio would."""
        exc = context.get("exception")
        line = f"asyncio: {context.get('message', '')}"
        if exc is not None:
            line += f" ({type(exc).__name__}: {exc})"
        self.loop_errors.append(line)
        loop.default_exception_handler(context)

    def take(self) -> list[str]:
        taken, self.records = self.records, []
        loop_errors, self.loop_errors = self.loop_errors, []
        out = list(loop_errors)
        for record in taken:
            line = f"{record.name}: {record.getMessage()}"
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                line += f" ({type(exc).__name__}: {exc})"
            out.append(line)
        return out


_relay_ids = itertools.count(1)


class RelayThread(LoopbackServer):
    """A relay served by uvicorn in a background thread with its own event loop."""

    def __init__(
        self,
        config: Config,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Clock | None = None,
    ):
        """`clock`: the time the relay's cache reads (a `ManualClock` the test moves)."""
        self.config = config
        self.transport = transport if transport is not None else make_transport(config)
        self.clock = clock
        self.server: RelayServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._thread: threading.Thread | None = None
        self._errors = _ErrorCapture(f"relay-{next(_relay_ids)}")
        self.stopped = False
        self.violations_at_stop: list[str] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RelayThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = build_server(self.config, transport=self.transport, clock=self.clock)
        server = self.server
        LoopbackServer.started()

        def run() -> None:
            if event_loop(self.config) == "asyncio":
                loop = asyncio.new_event_loop()
            else:
                import uvloop

                loop = uvloop.new_event_loop()
            loop.set_exception_handler(self._errors.on_loop_exception)
            self.loop = loop
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            finally:
                sock.close()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        logging.getLogger().addHandler(self._errors)
        self._thread = threading.Thread(target=run, name=self._errors.thread_name, daemon=True)
        self._thread.start()
        _started.append(self)
        if not wait_until(lambda: server.started, timeout=15):
            raise RuntimeError("relay did not start")
        return self

    def stop(self) -> None:
        if self.server is None or self._thread is None or self.stopped:
            return
        if INVARIANTS.enabled and self._thread.is_alive():
            # Checked here, while the relay still runs; the conftest hook reports them.
            self.violations_at_stop = self.invariant_violations()
        self.stopped = True
        self.server.should_exit = True
        self._thread.join(30)
        logging.getLogger().removeHandler(self._errors)
        if self._thread.is_alive():
            raise RuntimeError("relay thread did not stop")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.stopped

    @property
    def limiter(self) -> StreamLimiter:
        """The relay's stream slots (touch it on the relay's loop: `relay.call`)."""
        assert self.server is not None
        app: Any = self.server.config.app
        limiter: StreamLimiter = app.state.limiter
        return limiter

    def streams_active(self) -> int:
        """Stream slots held (StreamLimiter.active)."""
        limiter = self.limiter
        return int(self.call(lambda: limiter.active))

    def stray_tasks(self) -> list[str]:
        stray: list[str] = self.call(_stray_tasks)
        return stray

    def logged_errors(self) -> list[str]:
        """Unhandled exceptions logged on the relay's thread since the last call."""
        return self._errors.take()

    def invariant_violations(self, *, timeout: float | None = None) -> list[str]:
        """Wait (bounded) for the relay to settle, then list what it still holds: stream
        slots, checked-out upstream connections, its own tasks, logged unhandled exceptions."""
        wait = INVARIANTS.settle_timeout if timeout is None else timeout
        held: dict[str, object] = {}

        def settled() -> bool:
            held["slots"] = self.streams_active()
            held["connections"] = self.connections_in_use()
            held["tasks"] = self.stray_tasks()
            return held["slots"] == 0 and held["connections"] == 0 and not held["tasks"]

        wait_until(settled, timeout=wait)
        violations = []
        if held["slots"]:
            violations.append(f"{held['slots']} stream slot(s) still held")
        if held["connections"]:
            violations.append(f"{held['connections']} upstream connection(s) still checked out")
        if held["tasks"]:
            violations.append(f"relay task(s) still running: {held['tasks']}")
        violations.extend(f"unhandled exception logged: {e}" for e in self.logged_errors())
        return violations

    def check_invariants(self, *, timeout: float | None = None) -> None:
        """Raise InvariantViolation if the relay does not settle clean (see above)."""
        violations = self.invariant_violations(timeout=timeout)
        if violations:
            raise InvariantViolation(f"relay on port {self.port}: " + "; ".join(violations))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the relay's loop thread (to read state the loop mutates)."""
        assert self.loop is not None

        async def wrapper() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(10)

    def pool_stats(self) -> PoolStats:
        transport = self.transport
        assert isinstance(transport, PooledTransport)
        stats: PoolStats = self.call(transport.pool_stats)
        return stats

    def requests_waiting(self) -> int:
        """Requests waiting for a free upstream connection (the transport's count)."""
        transport = self.transport
        assert isinstance(transport, AiohttpTransport)
        return int(self.call(transport.requests_waiting))

    def connections_in_use(self) -> int:
        """Checked-out upstream connections, counted by relay and by the transport library."""
        stats = self.pool_stats()
        counted = getattr(self.transport, "connector_in_use", None)
        library = self.call(counted) if counted is not None else 0
        return max(stats.in_use, int(library))

    def settled(self, *, timeout: float = 10.0) -> bool:
        """True once no upstream connection is checked out."""
        return wait_until(lambda: self.connections_in_use() == 0, timeout=timeout)


def relay_config(origin_url: str, **overrides: Any) -> Config:
    routes = overrides.pop(
        "routes", (Route(prefix="/o/", upstream=origin_url + "/", allow_private=True),)
    )
    base = Config(routes=routes, log_level="warning", downloads_open=True)
    return dataclasses.replace(base, **overrides)


@contextlib.contextmanager
def running_relay(config: Config, **kwargs: Any) -> Iterator[RelayThread]:
    relay = RelayThread(config, **kwargs).start()
    try:
        yield relay
    finally:
        relay.stop()


def raw_http(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send raw bytes, return everything received until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        with contextlib.suppress(TimeoutError, ConnectionResetError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)


def abort_download(port: int, path: str, nbytes: int) -> None:
    """Start a download and reset the connection (RST) after nbytes of the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        got = 0
        while got < nbytes:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def read_slowly(port: int, path: str) -> tuple[int, str]:
    """Download reading 4 KiB every 0.1 s (about 40 KB/s) through a 32 KiB receive buffer,
    for at most 60 s; return the bytes received and how it ended: reset, eof or timeout.

    The small buffer matters: a reset reaches the application only after the data queued
    before it, which a large buffer read this slowly would take minutes to give."""
    received = 0
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: r\r\n\r\n".encode())
        for _ in range(600):
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                return received, "reset"
            if not chunk:
                return received, "eof"
            received += len(chunk)
            time.sleep(0.1)
    return received, "timeout"


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def sha256_stream(response: httpx.Response) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in response.iter_raw():
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


CURL = shutil.which("curl")


def curl(url: str, *args: str, timeout: float = 120) -> tuple[int, str, int]:
    """Run curl; return (exit code, sha256 of the body, body size)."""
    assert CURL is not None
    proc = subprocess.run(
        [CURL, "-sS", "-o", "-", *args, url], capture_output=True, timeout=timeout, check=False
    )
    return proc.returncode, hashlib.sha256(proc.stdout).hexdigest(), len(proc.stdout)


def _held_by_relay() -> tuple[int, int]:
    """Body bytes relay holds (run on relay's loop): the most buffered by one upstream
    response (aiohttp's reader) and the most unsent in one client transport."""
    from aiohttp.streams import EmptyStreamReader, StreamReader
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from relay.net.transports.aiohttp_compat import buffered_bytes

    objects = gc.get_objects()
    readers = [
        o for o in objects if isinstance(o, StreamReader) and not isinstance(o, EmptyStreamReader)
    ]
    # A probe that found no reader measured nothing: the bounds asserted on it would hold
    # vacuously. (aiohttp_compat checks at import that readers still keep their size.)
    assert readers, "no aiohttp StreamReader found in relay's process"
    upstream = [buffered_bytes(o) for o in readers]
    downstream = [
        o.transport.get_write_buffer_size()
        for o in objects
        if isinstance(o, HttpToolsProtocol) and not o.transport.is_closing()
    ]
    return max(upstream, default=0), max(downstream, default=0)


def held_for_a_slow_client(relay: RelayThread, size: int = 256 * 1024 * 1024) -> tuple[int, int]:
    """Download /o/gen/<size> slower than relay's SLOW_RATE (at most 16 KiB per 5 ms) for
    4 MiB, stop reading, and return what relay holds once steady: (upstream, downstream)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(f"GET /o/gen/{size} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        received = 0
        while received < 4 * 1024 * 1024:
            chunk = sock.recv(16 * 1024)
            if not chunk:
                raise AssertionError("relay closed the connection")
            received += len(chunk)
            time.sleep(0.005)
        # The client stops reading; relay fills the socket buffers and then waits.
        readings: list[tuple[int, int]] = []

        def steady() -> bool:
            readings.append(relay.call(_held_by_relay))
            return len(readings) > 3 and len(set(readings[-3:])) == 1

        if not wait_until(steady, timeout=20):
            raise AssertionError(f"relay's buffers never settled: {readings[-5:]}")
        return readings[-1]
