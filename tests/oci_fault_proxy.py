"""A fault-injecting HTTP/1.1 proxy in front of a real registry (tests and bench).

Relay (or a proxy-mode `docker-registry`) is pointed at the proxy instead of the registry.
It forwards each request to the registry unchanged and streams the answer back, and on
demand misbehaves the way upstream registries do:

    proxy = FaultProxy(registry.url).start()
    proxy.add_fault(Fault(r"/blobs/sha256:", cut_after=1 << 20))   # cut a blob after 1 MiB
    proxy.add_fault(Fault(r"/manifests/", method="GET", status=429, times=0))  # rate limited
    proxy.add_fault(Fault(r"/blobs/" + digest, tamper_at=1000))    # flip one byte
    proxy.hold(r"/blobs/")      # requests wait (after being recorded) until proxy.release()
    proxy.rate = 50 << 20       # pace every response body at 50 MiB/s
    proxy.count("GET", r"/blobs/" + digest); proxy.authorizations(); proxy.body_bytes

`stop()` closes the listener and every connection: an upstream that is down (connections
refused). Every request is recorded with its method, path, query and headers (at most
`MAX_RECORDS`), before any fault or hold applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import threading
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from tests.harness import wait_until
from tests.loopback import LoopbackServer

MAX_RECORDS = 100_000
PIECE = 1024 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_ERROR_CODES = {429: "TOOMANYREQUESTS", 503: "UNAVAILABLE", 500: "UNKNOWN", 502: "UNKNOWN"}


@dataclasses.dataclass
class Fault:
    """What to do to requests whose path matches `path` (a regex, searched) and `method`."""

    path: str
    method: str = "GET"
    status: int = 0
    """Answer this status with a registry error body instead of forwarding."""
    cut_after: int = -1
    """Forward the head and this many body bytes, then reset the connection."""
    tamper_at: int = -1
    """Flip the body byte at this offset (from the start of this response's body)."""
    times: int = 1
    """Requests it applies to; 0: every matching request until `clear_faults()`."""


@dataclasses.dataclass(frozen=True)
class ProxyRecord:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    """Lower-cased names; a repeated header's values joined with ", "."""


class FaultProxy(LoopbackServer):
    """See the module docstring."""

    def __init__(self, upstream: str, *, port: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        split = urlsplit(self.upstream)
        assert split.scheme == "http", "the fault proxy forwards to a plain-http registry"
        self._up_host = split.hostname or "127.0.0.1"
        self._up_port = split.port or 80
        self.port = port
        self.rate = 0
        """Bytes per second each response body is paced at (0: as fast as it goes)."""
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._records: list[ProxyRecord] = []
        self._body_bytes = 0
        self._held: re.Pattern[str] | None = None
        self._gate: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- control (any thread) ---------------------------------------------------------------

    def add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def hold(self, path: str) -> None:
        """Requests whose path matches wait, once recorded, until `release()`."""
        assert self._loop is not None
        ready = threading.Event()

        def close() -> None:
            self._gate = asyncio.Event()
            self._held = re.compile(path)
            ready.set()

        self._loop.call_soon_threadsafe(close)
        ready.wait(5)

    def release(self) -> None:
        loop, gate = self._loop, self._gate
        if loop is not None and gate is not None:
            loop.call_soon_threadsafe(gate.set)

    @property
    def records(self) -> list[ProxyRecord]:
        with self._lock:
            return list(self._records)

    def count(self, method: str, path: str) -> int:
        """Requests recorded with this method whose path matches the regex `path`."""
        pattern = re.compile(path)
        return sum(1 for r in self.records if r.method == method and pattern.search(r.path))

    def authorizations(self) -> list[str]:
        """Every Authorization header value the proxy received."""
        return [r.headers["authorization"] for r in self.records if "authorization" in r.headers]

    @property
    def body_bytes(self) -> int:
        """Response body bytes sent (since start or `reset()`)."""
        with self._lock:
            return self._body_bytes

    def reset(self) -> None:
        with self._lock:
            self._records.clear()
            self._body_bytes = 0

    def wait_for(self, predicate: Callable[[FaultProxy], bool], timeout: float = 10.0) -> bool:
        return wait_until(lambda: predicate(self), timeout=timeout)

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("FaultProxy already started")
        self._thread = threading.Thread(target=self._run, name="oci-fault-proxy", daemon=True)
        LoopbackServer.started()
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None:
            return
        self.release()
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("fault proxy thread did not stop")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections[task] = writer
            try:
                await self._serve(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
            except asyncio.CancelledError:
                pass  # stop(): the connection ends with the proxy
            finally:
                connections.pop(task, None)
                writer.transport.abort()

        try:
            server = await asyncio.start_server(on_connect, "127.0.0.1", self.port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task, writer in list(connections.items()):
                writer.transport.abort()
                task.cancel()
            if connections:
                await asyncio.wait(list(connections), timeout=10)
            await server.wait_closed()

    # ---- serving ----------------------------------------------------------------------------

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method == method and re.search(fault.path, path):
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            first = await reader.readexactly(1)
            if not first.isalpha():
                return  # a TLS ClientHello (a client trying https first): refused at once
            head = first + await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
            headers: list[tuple[str, str]] = []
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers.append((name.strip(), value.strip()))
            joined: dict[str, str] = {}
            for name, value in headers:
                key = name.lower()
                joined[key] = f"{joined[key]}, {value}" if key in joined else value
            body = b""
            if "content-length" in joined:
                body = await reader.readexactly(int(joined["content-length"]))
            path, _, query = target.partition("?")
            with self._lock:
                if len(self._records) < MAX_RECORDS:
                    self._records.append(ProxyRecord(method, path, query, joined))
            if self._held is not None and self._gate is not None and self._held.search(path):
                await self._gate.wait()
            fault = self._take_fault(method, path)
            if fault is not None and fault.status:
                await self._answer_error(writer, fault.status)
                continue
            keep = await self._forward(writer, method, target, headers, body, fault)
            if not keep or joined.get("connection", "").lower() == "close":
                return

    async def _answer_error(self, writer: asyncio.StreamWriter, status: int) -> None:
        code = _ERROR_CODES.get(status, "UNKNOWN")
        body = json.dumps({"errors": [{"code": code, "message": "fault proxy", "detail": None}]})
        data = body.encode()
        writer.write(
            (
                f"HTTP/1.1 {status} Fault\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n"
                "Docker-Distribution-Api-Version: registry/2.0\r\n\r\n"
            ).encode()
            + data
        )
        await writer.drain()

    async def _forward(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes,
        fault: Fault | None,
    ) -> bool:
        """Forward one request on a connection of its own to the registry (plain asyncio
        streams: a Python HTTP client would cap the proxy near the rates it paces at);
        return whether the client's connection may serve another."""
        up_reader, up_writer = await asyncio.open_connection(self._up_host, self._up_port)
        try:
            out = [f"{method} {target} HTTP/1.1", f"Host: {self._up_host}:{self._up_port}"]
            out += [f"{n}: {v}" for n, v in headers if n.lower() not in HOP_BY_HOP | {"host"}]
            if not any(n.lower() == "accept-encoding" for n, _ in headers):
                out.append("Accept-Encoding: identity")
            out.append("Connection: close")
            up_writer.write(("\r\n".join(out) + "\r\n\r\n").encode("latin-1") + body)
            head = (await up_reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status_line, *lines = head.split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            response_headers = [
                (n.strip(), v.strip()) for n, _, v in (x.partition(":") for x in lines if x)
            ]
            names = {n.lower(): v for n, v in response_headers}
            length = names.get("content-length")
            no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
            chunked = not no_body and length is None
            sent = [status_line]
            sent += [f"{n}: {v}" for n, v in response_headers if n.lower() not in HOP_BY_HOP]
            if chunked:
                sent.append("Transfer-Encoding: chunked")
            writer.write(("\r\n".join(sent) + "\r\n\r\n").encode("latin-1"))
            if no_body:
                await writer.drain()
                return True
            if "chunked" in names.get("transfer-encoding", "").lower():
                pieces = _dechunk(up_reader)
            else:
                pieces = _read(up_reader, None if length is None else int(length))
            return await self._body(writer, pieces, fault, chunked)
        finally:
            up_writer.transport.abort()

    async def _body(
        self,
        writer: asyncio.StreamWriter,
        pieces: AsyncIterator[bytes],
        fault: Fault | None,
        chunked: bool,
    ) -> bool:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sent = 0
        cut = fault.cut_after if fault is not None else -1
        tamper = fault.tamper_at if fault is not None else -1
        async for data in pieces:
            piece = data
            if cut >= 0 and sent + len(piece) >= cut:
                piece = piece[: cut - sent]
            if 0 <= tamper - sent < len(piece):
                at = tamper - sent
                piece = piece[:at] + bytes([piece[at] ^ 0xFF]) + piece[at + 1 :]
            if chunked and piece:
                writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            elif piece:
                writer.write(piece)
            sent += len(piece)
            with self._lock:
                self._body_bytes += len(piece)
            await writer.drain()
            if cut >= 0 and sent >= cut:
                writer.transport.abort()
                return False
            if self.rate:
                ahead = sent / self.rate - (loop.time() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        if chunked:
            writer.write(b"0\r\n\r\n")
        await writer.drain()
        return True


async def _read(reader: asyncio.StreamReader, length: int | None) -> AsyncIterator[bytes]:
    """A body of `length` bytes (None: until the connection closes), in pieces."""
    left = length
    while left is None or left > 0:
        piece = await reader.read(PIECE if left is None else min(PIECE, left))
        if not piece:
            if left:
                raise ConnectionError("the registry closed before the end of the body")
            return
        if left is not None:
            left -= len(piece)
        yield piece


async def _dechunk(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """A chunked body's data, chunk by chunk (trailers skipped)."""
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass
            return
        yield await reader.readexactly(size)
        await reader.readexactly(2)
