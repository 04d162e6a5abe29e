"""A loopback upstream whose every byte is given by the test: the fuzz tier's raw origin.

``tests/origin.py`` is the origin with named faults; this one has none of its own. A test
says, per request path, what to send (bytes, with pauses or events between them) and how to
end (keep the connection for the next request, FIN, RST, or stall until the peer gives up),
and reads back what arrived (raw bytes, per connection)::

    with ScriptedUpstream() as upstream:
        cut = b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nhel"
        upstream.script("/a", Reply([cut], "rst"))
        ...
        upstream.received[-1].raw   # b"GET /a HTTP/1.1\\r\\nHost: ...\\r\\n\\r\\n"

Blocking sockets, one thread per connection: nothing here shares an event loop with relay.
"""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Literal

from tests.loopback import LoopbackServer

End = Literal["keep", "fin", "rst", "stall"]

NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 10\r\n\r\nnot found\n"


@dataclasses.dataclass(frozen=True)
class Reply:
    """What the upstream does for one request: each bytes item is sent, each float is a
    pause (seconds), each event is waited for (set by the test once what it waits for is
    observable; bounded), then `end`: "keep" reads the next request on the same connection,
    "fin" closes, "rst" resets, "stall" sends nothing more until the peer closes."""

    parts: Sequence[bytes | float | threading.Event]
    end: End = "keep"


@dataclasses.dataclass(frozen=True)
class Received:
    connection: int  # 1, 2, ... in accept order
    raw: bytes  # the request head (and a Content-Length body) exactly as it arrived

    @property
    def target(self) -> bytes:
        parts = self.raw.split(b"\r\n", 1)[0].split(b" ")
        return parts[1] if len(parts) > 1 else b""


class ScriptedUpstream(LoopbackServer):
    def __init__(self) -> None:
        self._replies: dict[bytes, list[Reply]] = {}
        self._lock = threading.Lock()
        self._received: list[Received] = []
        self._conns: dict[int, socket.socket] = {}
        self._accepted = 0
        self._closing = False
        self._listener = socket.create_server(("127.0.0.1", 0))
        LoopbackServer.started()
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept, name="scripted-upstream", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, path: str | bytes, reply: Reply, *then: Reply) -> None:
        """Answer every request for `path` (the request target, query included) with `reply`;
        with `then`, the first request gets `reply`, the next ones each of `then` in turn, the
        last of which answers all later ones."""
        key = path.encode() if isinstance(path, str) else path
        with self._lock:
            self._replies[key] = [reply, *then]

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._accepted

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def is_open(self, connection: int) -> bool:
        """Whether connection number `connection` (Received.connection) is still open here."""
        with self._lock:
            return connection in self._conns

    def start(self) -> ScriptedUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._closing = True
        self._listener.close()
        with self._lock:
            conns = list(self._conns.values())
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)

    def __enter__(self) -> ScriptedUpstream:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)  # closing the socket does not wake accept()
        while not self._closing:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            with self._lock:
                self._accepted += 1
                number = self._accepted
                self._conns[number] = conn
            threading.Thread(
                target=self._serve, args=(conn, number), name=f"scripted-{number}", daemon=True
            ).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        buffer = b""
        try:
            while not self._closing:
                request, buffer = _read_request(conn, buffer)
                if request is None:
                    return
                with self._lock:
                    self._received.append(Received(number, request))
                    replies = self._replies.get(Received(number, request).target)
                    reply = None
                    if replies:
                        reply = replies.pop(0) if len(replies) > 1 else replies[0]
                if reply is None:
                    conn.sendall(NOT_FOUND)
                    continue
                for part in reply.parts:
                    if isinstance(part, bytes):
                        conn.sendall(part)
                    elif isinstance(part, threading.Event):
                        part.wait(30)
                    else:
                        time.sleep(part)
                if reply.end == "keep":
                    continue
                if reply.end == "rst":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                elif reply.end == "stall":
                    _wait_closed(conn, lambda: self._closing)
                return
        except OSError:
            return
        finally:
            conn.close()
            with self._lock:
                self._conns.pop(number, None)


def _read_request(conn: socket.socket, buffer: bytes) -> tuple[bytes | None, bytes]:
    """One request head (plus a Content-Length body) from the connection, and what follows."""
    while b"\r\n\r\n" not in buffer:
        chunk = conn.recv(65536)
        if not chunk:
            return None, b""
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length" and value.strip().isdigit():
            length = int(value.strip())
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


def _wait_closed(conn: socket.socket, closing: Callable[[], bool]) -> None:
    """Read and drop until the peer closes (or the upstream stops)."""
    while not closing():
        ready, _, _ = select.select([conn], [], [], 0.1)
        if ready and not conn.recv(65536):
            return
