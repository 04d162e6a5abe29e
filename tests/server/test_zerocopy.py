"""The ASGI Zero Copy Send extension on relay's uvicorn protocol, against a small ASGI app served
by the real protocol over loopback (both event loops)."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs

import pytest
import uvicorn

from relay.server.run import RelayHttpToolsProtocol
from relay.server.uvicorn_compat import RequestResponseCycle
from relay.types import ZERO_COPY_SEND, Message, Receive, Scope, Send
from tests.harness import wait_until
from tests.loopback import LoopbackServer

pytestmark = pytest.mark.e2e  # a real uvicorn on loopback

DATA = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4: larger than one socket write


class App:
    """Answers GET /file?offset=&count=&pieces= with those bytes of `path`, sent zero-copy in
    `pieces` messages (the last one ending the body), and records what it saw."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.extensions: list[object] = []
        self.errors: list[str] = []
        self.positions: list[int] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert scope["type"] == "http"
        self.extensions.append(scope.get("extensions"))
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        mode = query.get("mode", "pieces")
        if mode == "chunked":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await self._try(send, {"type": ZERO_COPY_SEND, "file": 0, "count": 1})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        offset = int(query.get("offset", "0"))
        count = int(query.get("count", str(len(DATA) - offset)))
        length = int(query.get("length", str(count)))
        headers = [(b"content-length", str(length).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        with open(self.path, "rb") as file:
            if mode == "position":
                # No offset, no count: from the file's position to its end, advancing it.
                file.seek(offset)
                await send({"type": ZERO_COPY_SEND, "file": file, "more_body": False})
                self.positions.append(file.tell())
                return
            if mode == "too_long":
                message = {"type": ZERO_COPY_SEND, "file": file.fileno(), "offset": 0}
                await self._try(send, {**message, "count": length + 1})
                await send({"type": "http.response.body", "body": b"x" * length})
                return
            pieces = int(query.get("pieces", "1"))
            step = -(-count // pieces)
            position = offset
            while position < offset + count:
                n = min(step, offset + count - position)
                last = position + n >= offset + count
                message = {"type": ZERO_COPY_SEND, "file": file.fileno(), "offset": position}
                await send({**message, "count": n, "more_body": not last})
                position += n
            if count == 0:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _try(self, send: Send, message: Message) -> None:
        try:
            await send(message)
        except RuntimeError as exc:
            self.errors.append(str(exc))


@contextmanager
def serving(
    app: App, loop_name: str, protocol: type[RelayHttpToolsProtocol] = RelayHttpToolsProtocol
) -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=protocol, lifespan="off", log_config=None, ws="none")
    LoopbackServer.started()  # tests/conftest.py: a test serving this way is e2e
    server = uvicorn.Server(config)

    def run() -> None:
        loop: asyncio.AbstractEventLoop
        if loop_name == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        finally:
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert wait_until(lambda: server.started)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class Connection:
    """One kept-alive client connection speaking just enough HTTP/1.1."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def request(self, target: str, method: str = "GET") -> tuple[bytes, bytes]:
        self.sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        fields = dict(
            line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:] if b": " in line
        )
        if method == "HEAD":
            return head, b""
        if fields.get(b"transfer-encoding") == b"chunked":
            while b"0\r\n\r\n" not in self.buffer:
                self._fill()
            body, _, self.buffer = self.buffer.partition(b"0\r\n\r\n")
            return head, body
        length = int(fields[b"content-length"])
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return head, body

    def _fill(self) -> None:
        chunk = self.sock.recv(1 << 20)
        assert chunk, "connection closed"
        self.buffer += chunk

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def app(tmp_path: Path) -> App:
    path = tmp_path / "data"
    path.write_bytes(DATA)
    return App(path)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_file_bytes_go_out_zero_copy_and_the_connection_stays(app: App, loop_name: str) -> None:
    """The scope offers the extension; bytes at odd offsets, in several messages, are exact;
    the Content-Length count and keep-alive hold for the requests after them."""
    with serving(app, loop_name) as port:
        conn = Connection(port)
        try:
            for offset, count, pieces in [(0, len(DATA), 1), (7, 300001, 3), (len(DATA) - 1, 1, 1)]:
                head, body = conn.request(f"/file?offset={offset}&count={count}&pieces={pieces}")
                assert head.startswith(b"HTTP/1.1 200 ")
                assert body == DATA[offset : offset + count]
            head, body = conn.request("/file?offset=5&count=0")
            assert (head.startswith(b"HTTP/1.1 200 "), body) == (True, b"")
        finally:
            conn.close()
    assert all(e == {ZERO_COPY_SEND: {}} for e in app.extensions), app.extensions
    assert app.errors == []


def test_without_offset_and_count_the_file_position_is_used_and_advanced(
    app: App, loop_name: str
) -> None:
    with serving(app, loop_name) as port:
        conn = Connection(port)
        try:
            _, body = conn.request(f"/file?mode=position&offset=1000&length={len(DATA) - 1000}")
        finally:
            conn.close()
    assert body == DATA[1000:]
    assert app.positions == [len(DATA)]


def test_a_head_request_sends_no_body(app: App) -> None:
    with serving(app, "uvloop") as port:
        conn = Connection(port)
        try:
            head, _ = conn.request("/file?offset=0&count=100", method="HEAD")
            assert b"content-length: 100" in head.lower()
            head, body = conn.request("/file?offset=3&count=10")
            assert body == DATA[3:13]  # nothing of the HEAD's body came before it
        finally:
            conn.close()


def test_a_chunked_response_or_a_count_past_content_length_is_refused(app: App) -> None:
    """Refused with RuntimeError, as uvicorn refuses a body longer than its Content-Length;
    nothing is written, and the response can still end properly."""
    with serving(app, "uvloop") as port:
        conn = Connection(port)
        try:
            head, body = conn.request("/file?mode=chunked")
            assert b"transfer-encoding: chunked" in head.lower()
            assert body == b""
            head, body = conn.request("/file?mode=too_long&length=10")
            assert body == b"x" * 10
        finally:
            conn.close()
    assert app.errors == [
        "zero-copy send needs a response with Content-Length",
        "Response content longer than Content-Length",
    ]


def test_the_extension_can_be_left_off(app: App) -> None:
    class NoZeroCopy(RelayHttpToolsProtocol):
        zero_copy = False

    with serving(app, "asyncio", NoZeroCopy) as port:
        conn = Connection(port)
        try:
            conn.sock.sendall(b"GET /file?mode=chunked HTTP/1.1\r\nHost: t\r\n\r\n")
            assert wait_until(lambda: bool(app.extensions))
        finally:
            conn.close()
    assert app.extensions == [None]


def test_no_file_descriptor_is_left_open(app: App) -> None:
    """The writability waits' dup()s are closed: a slow reader makes many of them."""
    with serving(app, "uvloop") as port:
        before = len(os.listdir("/proc/self/fd"))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.connect(("127.0.0.1", port))
        sock.settimeout(10)
        sock.sendall(b"GET /file HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        got = b""
        while chunk := sock.recv(8192):
            got += chunk
        sock.close()
        assert got.endswith(DATA)
        assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= before)


def test_a_finished_cycle_is_freed_without_the_collector(app: App) -> None:
    """The send set on a cycle refers back to it weakly: no reference cycle keeps each finished
    request's cycle (and its scope) alive until the garbage collector runs."""
    gc.collect()
    gc.disable()
    try:
        with serving(app, "uvloop") as port:
            conn = Connection(port)
            try:
                for _ in range(20):
                    _, body = conn.request("/file?offset=0&count=100000")
                    assert body == DATA[:100000]
                alive = sum(isinstance(o, RequestResponseCycle) for o in gc.get_objects())
            finally:
                conn.close()
    finally:
        gc.enable()
    assert alive <= 2
