"""Running a real relay under uvicorn on loopback, and the clients tests drive it with."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from relay.config import Config, Route
from relay.server import RelayServer, build_server, event_loop
from relay.transports import PooledTransport, PoolStats, make_transport


def wait_until(predicate: Callable[[], bool], *, timeout: float = 10.0) -> bool:
    """Poll until predicate() is true; bounded, returns whether it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


class RelayThread:
    """A relay served by uvicorn in a background thread with its own event loop."""

    def __init__(self, config: Config, *, transport: httpx.AsyncBaseTransport | None = None):
        self.config = config
        self.transport = transport if transport is not None else make_transport(config)
        self.server: RelayServer | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port = 0
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RelayThread:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.server = build_server(self.config, transport=self.transport)
        server = self.server

        def run() -> None:
            if event_loop(self.config) == "asyncio":
                loop = asyncio.new_event_loop()
            else:
                import uvloop

                loop = uvloop.new_event_loop()
            self.loop = loop
            try:
                loop.run_until_complete(server.serve(sockets=[sock]))
            finally:
                sock.close()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="relay", daemon=True)
        self._thread.start()
        if not wait_until(lambda: server.started, timeout=15):
            raise RuntimeError("relay did not start")
        return self

    def stop(self) -> None:
        if self.server is None or self._thread is None:
            return
        self.server.should_exit = True
        self._thread.join(30)
        if self._thread.is_alive():
            raise RuntimeError("relay thread did not stop")

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
    from aiohttp.streams import StreamReader
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    objects = gc.get_objects()
    upstream = [o._size for o in objects if isinstance(o, StreamReader) and hasattr(o, "_size")]
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
