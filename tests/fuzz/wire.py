"""Reading one HTTP/1.1 response off a raw socket, framing checked byte by byte.

The fuzz tier needs to know not just what a client got but how the body ended: a body
relay's upstream did not finish must never end cleanly (Content-Length reached, a last
chunk, or a FIN on a close-delimited body).
"""

from __future__ import annotations

import dataclasses
import re
import socket

# What relay's 5xx bodies look like: the status and a short lower-case phrase of relay's own
# (never parser text such as `bytearray(b'...')` or `status_code should...`, never upstream
# bytes; the log keeps those).
GENERIC_5XX_BODY = re.compile(rb"\d{3} [a-z][A-Za-z0-9 ,;:()/_-]{0,100}\n?")


@dataclasses.dataclass
class WireResponse:
    status: int  # 0: no parseable status line
    headers: list[tuple[bytes, bytes]]
    body: bytes  # de-chunked
    raw: bytes  # everything received, interim responses included
    complete: bool  # the body ended as its framing says it ends, cleanly
    ended: str  # how reading stopped: "framing", "fin", "rst", "timeout"

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


class _Reader:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""
        self.raw = b""
        self.ended = ""

    def _more(self) -> bool:
        if self.ended:
            return False
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            self.ended = "timeout"
            return False
        except ConnectionResetError:
            self.ended = "rst"
            return False
        if not chunk:
            self.ended = "fin"
            return False
        self.buffer += chunk
        self.raw += chunk
        return True

    def until(self, marker: bytes) -> bytes | None:
        while marker not in self.buffer:
            if not self._more():
                return None
        out, _, self.buffer = self.buffer.partition(marker)
        return out

    def exactly(self, n: int) -> bytes | None:
        while len(self.buffer) < n:
            if not self._more():
                return None
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def rest(self) -> bytes:
        while self._more():
            pass
        out, self.buffer = self.buffer, b""
        return out


def read_response(sock: socket.socket, *, head_request: bool = False) -> WireResponse:
    reader = _Reader(sock)
    while True:
        head = reader.until(b"\r\n\r\n")
        if head is None:
            return WireResponse(0, [], b"", reader.raw, False, reader.ended)
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip(), value.strip()))
        if not 100 <= status < 200 or status == 101:
            break
    response = WireResponse(status, headers, b"", b"", False, "")
    lengths = response.header(b"content-length")
    chunked = any(b"chunked" in v.lower() for v in response.header(b"transfer-encoding"))
    if head_request or status in (204, 304) or status < 200:
        response.complete = True
    elif chunked:
        body = b""
        while True:
            size_line = reader.until(b"\r\n")
            if size_line is None:
                break
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                break
            if size == 0:
                trailer = reader.until(b"\r\n")
                while trailer:  # trailer fields, up to the empty line
                    trailer = reader.until(b"\r\n")
                response.complete = trailer == b""
                break
            data = reader.exactly(size + 2)
            if data is None:
                body += reader.buffer
                break
            body += data[:-2]
        response.body = body
    elif lengths:
        try:
            length = int(lengths[0])
        except ValueError:
            length = -1
        data = reader.exactly(length) if length >= 0 else None
        response.body = data if data is not None else reader.buffer
        response.complete = data is not None
    else:
        response.body = reader.rest()
        response.complete = reader.ended == "fin"
    response.raw = reader.raw
    response.ended = reader.ended or "framing"
    return response
