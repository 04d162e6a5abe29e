"""A small, fast, fault-injecting HTTP/1.1 origin server for tests and benchmarks.

Plain asyncio streams (no framework) so it can misbehave at the byte level.  Stdlib only.

Use it in-process::

    with Origin() as origin:
        httpx.get(origin.url + "/gen/1m?close_after=1000")
        origin.requests[-1].header("user-agent")

or in the foreground (benchmarks)::

    python -m tests.origin --host 127.0.0.1 --port 9000

Endpoints
---------
``GET|HEAD /gen/<size>``
    Deterministic body (``byte i = BASE[i % P]``), sizes like ``1024``, ``64k``, ``1m``, ``1g``.
    Validators, conditional requests (304), single byte ranges (206/416, ``If-Range``),
    ``?gzip=1`` and ``?cl=0`` (chunked).  Fault parameters: ``close_after``, ``reset_after``,
    ``stall_after``, ``stall_headers``, ``reset_headers``, ``chunked_die``, ``bad_framing``
    (``cl_te`` | ``dup_cl`` | ``bad_chunk``), ``delay``, ``drop_once`` (+ ``key``),
    ``etag_changes``, ``lie_length``, ``slow``; ``v`` sets the ETag version; ``cc`` replaces
    the Cache-Control value, ``vary`` adds a Vary header, ``repr_digest=good|bad`` a
    ``Repr-Digest`` of the whole body (``bad``: of zeros), ``content_digest=good|bad`` a
    ``Content-Digest`` of the bytes of this message (a 206's range).  ``vkey=<name>``: the
    version (ETag) is the one last set by ``Origin.set_version(name, n)`` (``v`` until then),
    and the body starts ``version`` bytes into the content, so versions differ: version k's
    bytes ``[a, b)`` hash to ``expected_sha256(size + k, a + k, b + k)``.  ``gate=<name>``:
    a conditional request waits while ``Origin.close_gate(name)`` holds it (until
    ``open_gate``), so a test knows every client arrived while the revalidation was pending.
    Continuation faults: ``stall_resume_once`` (+ ``key``: the first request with a Range
    stalls before its headers), ``ignore_if_range`` (a Range is served even when If-Range
    does not match), ``bare_206`` (206 responses carry no ETag or Last-Modified).
    Hostile upstreams: ``smuggle=<seconds>`` (after a complete kept-alive response, wait, and
    with ``gate=<name>`` until the gate is open, then send a second, unrequested response
    carrying ``X-Smuggled: yes``), ``http10=1`` (answer
    ``HTTP/1.0`` with no Content-Length: the body ends at close; with ``reset_after`` it ends
    with an RST instead of a FIN), ``trickle_headers=<seconds>`` (the status line, then one
    header line per interval, never completing the head, up to ``TRICKLE_LINES`` lines, then
    close), ``bad_head=<kind>`` (a malformed response head, see ``BAD_HEADS``: ``status999``,
    ``status600``, ``status099``, ``ctl01``, ``ctl7f`` (a control byte in a header value),
    ``cl_space`` (``Content-Length : 5``), ``te_gzip`` (``Transfer-Encoding: gzip, chunked``
    with a gzip body)).
``GET /status/<code>``, ``GET /redirect?to=<url>&code=302``, ``ANY /echo`` (JSON of the
request), ``GET /headers?set=Name:Value&set=...`` (extra response headers).
``GET /links``: an app server building absolute URLs from ``X-Forwarded-Proto`` /
``X-Forwarded-Host`` (else its ``Host``), as devpi and Nexus do: a cacheable HTML page linking
to ``<base>/gen/1k``, or with ``redirect=1`` a 302 there (``cc`` replaces Cache-Control).
Any path: ``/p/<k=v&k2=v2>/<path>`` serves ``<path>`` with those parameters (before the
query's): a base URL that carries faults, e.g. one mirror of several that dies mid-body;
``answer=<code>`` answers that status with a short body, ``gen=<size>`` serves
``/gen/<size>`` for any path below (a digest-named path: ``.../blobs/sha256:<hex>``).
``pause_after=<n>`` with ``gate=<name>``: the body stops after (at least) ``n`` bytes while
the gate is closed, so a test sees what clients got of a body still being fetched.
``hold=<name>`` makes the request wait, after being recorded, while ``Origin.close_gate(name)``
holds it (before its response head), so a test knows every client arrived while that one
upstream request was pending.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import calendar
import contextlib
import email.utils
import hashlib
import http
import itertools
import json
import logging
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit

from tests.loopback import LoopbackServer

__all__ = [
    "BAD_HEADS",
    "BASE",
    "CHUNK",
    "ETAG_CHANGES_START",
    "GZIP_MAX",
    "LAST_MODIFIED",
    "LAST_MODIFIED_TS",
    "SMUGGLED",
    "TRICKLE_LINES",
    "Origin",
    "P",
    "RequestRecord",
    "body_bytes",
    "expected_sha256",
    "gzip_body",
    "iter_body",
    "main",
    "parse_size",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Deterministic content
# --------------------------------------------------------------------------------------------

#: Period of the generated content; prime, so an offset error of any whole MiB shows up.
P = 1_048_573
#: The repeating block: ``byte at offset i = BASE[i % P]``.
BASE: bytes = random.Random(1234).randbytes(P)
#: Natural write size (bytes per ``writer.write`` + ``drain``) and default chunk of ``iter_body``.
CHUNK = 256 * 1024
#: Largest body served gzip-compressed (``?gzip=1``); bigger ones are served as identity.
GZIP_MAX = 64 * 1024 * 1024

# ``BASE`` twice: any window of up to ``P`` bytes starting at any offset < P is one slice.
_BUF: bytes = BASE * 2
_VIEW = memoryview(_BUF)

LAST_MODIFIED = "Wed, 01 Jan 2025 00:00:00 GMT"
LAST_MODIFIED_TS = calendar.timegm((2025, 1, 1, 0, 0, 0, 0, 0, 0))
#: First ETag version handed out by ``etag_changes=1`` (far above any plausible ``?v=``).
ETAG_CHANGES_START = 1_000_001

_SIZE_RE = re.compile(r"(\d+)([kmg]?)", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(text: str) -> int:
    """``"1024"`` -> 1024, ``"64k"`` -> 65536, ``"1m"``, ``"1g"`` (KiB/MiB/GiB; any case)."""
    m = _SIZE_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"invalid size: {text!r}")
    return int(m.group(1)) * _SUFFIX[m.group(2).lower()]


def _window(size: int, start: int, end: int | None) -> tuple[int, int]:
    stop = size if end is None else end
    if size < 0 or not 0 <= start <= stop <= size:
        raise ValueError(f"invalid window start={start} end={end} for size={size}")
    return start, stop


def _slices(start: int, stop: int, chunk: int) -> Iterator[memoryview]:
    pos = start
    while pos < stop:
        n = min(chunk, stop - pos)
        off = pos % P
        yield _VIEW[off : off + n]
        pos += n


def iter_body(
    size: int, start: int = 0, end: int | None = None, chunk: int = CHUNK
) -> Iterator[memoryview]:
    """The bytes ``[start, end)`` of the ``size``-byte generated body, as zero-copy slices.

    ``end`` is exclusive (``None`` = ``size``), like a Python slice; for the HTTP range
    ``bytes=a-b`` use ``start=a, end=b + 1``.  Each slice is at most ``chunk`` bytes (capped at P).
    """
    start, stop = _window(size, start, end)
    return _slices(start, stop, max(1, min(chunk, P)))


def body_bytes(size: int, start: int = 0, end: int | None = None) -> bytes:
    """``iter_body`` joined into one ``bytes`` object (for small sizes)."""
    return b"".join(iter_body(size, start, end))


_sha_cache: dict[tuple[int, int], str] = {}
_sha_lock = threading.Lock()


def expected_sha256(size: int, start: int = 0, end: int | None = None) -> str:
    """Hex SHA-256 of ``body_bytes(size, start, end)``, computed streaming and cached."""
    key = _window(size, start, end)
    with _sha_lock:
        cached = _sha_cache.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    for piece in _slices(key[0], key[1], P):
        h.update(piece)
    digest = h.hexdigest()
    with _sha_lock:
        _sha_cache[key] = digest
    return digest


_gzip_cache: dict[int, bytes] = {}
_gzip_lock = threading.Lock()


def gzip_body(size: int) -> bytes:
    """The gzip encoding (level 6, mtime 0) of the ``size``-byte generated body; cached."""
    if not 0 <= size <= GZIP_MAX:
        raise ValueError(f"gzip only for sizes <= {GZIP_MAX}")
    with _gzip_lock:
        data = _gzip_cache.get(size)
        if data is None:
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)
            parts = [comp.compress(piece) for piece in _slices(0, size, P)]
            parts.append(comp.flush())
            data = _gzip_cache[size] = b"".join(parts)
        return data


# --------------------------------------------------------------------------------------------
# Introspection
# --------------------------------------------------------------------------------------------


@dataclass
class RequestRecord:
    """One request as received (recorded after the head and any Content-Length body were read)."""

    method: str
    target: str  # raw request-target, e.g. "/gen/1m?v=2"
    http_version: str  # "HTTP/1.1"
    headers: list[tuple[str, str]]  # in received order, names as sent
    client_port: int
    connection_id: int  # 1, 2, ... per accepted connection (reset by reset_stats)
    body_length: int = 0

    def header(self, name: str, default: str | None = None) -> str | None:
        """First value of header ``name`` (case-insensitive), or ``default``."""
        lname = name.lower()
        for n, v in self.headers:
            if n.lower() == lname:
                return v
        return default

    def header_all(self, name: str) -> list[str]:
        """All values of header ``name`` (case-insensitive), in received order."""
        lname = name.lower()
        return [v for n, v in self.headers if n.lower() == lname]

    def has_header(self, name: str) -> bool:
        return bool(self.header_all(name))

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> list[tuple[str, str]]:
        return parse_qsl(urlsplit(self.target).query, keep_blank_values=True)


class _Stats:
    def __init__(self, record: bool) -> None:
        self.record = record
        self.lock = threading.Lock()
        self.requests: list[RequestRecord] = []
        self.open = 0
        self.total = 0
        self.dropped: set[tuple[str, int, str | None]] = set()
        # ``vkey`` name -> the version /gen serves for it (set by tests: the object changes).
        self.versions: dict[str, int] = {}
        # ``gate`` name -> released? (conditional requests naming a closed gate wait on it)
        self.gates: dict[str, threading.Event] = {}
        # Body bytes written by /gen (benchmarks: origin traffic behind a cache). Only the
        # origin's event-loop thread adds to it; readers see a whole int.
        self.body_bytes = 0

    def opened(self) -> int:
        with self.lock:
            self.open += 1
            self.total += 1
            return self.total

    def closed(self) -> None:
        with self.lock:
            self.open -= 1

    def add(self, rec: RequestRecord) -> None:
        if self.record:
            with self.lock:
                self.requests.append(rec)

    def first_drop(self, key: tuple[str, int, str | None]) -> bool:
        with self.lock:
            if key in self.dropped:
                return False
            self.dropped.add(key)
            return True

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.total = 0
            self.dropped.clear()
            self.body_bytes = 0


# --------------------------------------------------------------------------------------------
# HTTP plumbing
# --------------------------------------------------------------------------------------------

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TOKEN_S = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(\d)\.(\d)")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_ETAG_RE = re.compile(r'\s*(W/)?("[^"]*")\s*(?:,|$)')
_LIMIT = 64 * 1024
_MAX_HEADERS = 100
_LINGER = 2.0  # seconds to wait for the client's FIN after ours / for the send queue to drain
_SERVER = "relay-test-origin"
#: Header lines ``trickle_headers`` sends before giving up and closing.
TRICKLE_LINES = 120
#: The response ``smuggle`` sends unrequested after a complete one.
SMUGGLED = (
    b"HTTP/1.1 200 OK\r\nX-Smuggled: yes\r\nContent-Type: text/plain\r\n"
    b"Content-Length: 9\r\n\r\nsmuggled\n"
)
_CACHE_CONTROL = "public, max-age=3600"

try:  # unsent+unacked bytes in the kernel send queue (Linux); used before an RST
    import fcntl
    import termios

    _TIOCOUTQ: int | None = getattr(termios, "TIOCOUTQ", None)
except ImportError:  # pragma: no cover - non-POSIX
    _TIOCOUTQ = None

Action = Literal["keep", "close", "reset", "abort"]
Headers = list[tuple[str, str]]


class _BadRequest(Exception):
    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class _Request:
    method: str
    target: str
    version: tuple[int, int]
    headers: Headers
    path: str
    params: list[tuple[str, str]]
    body_length: int = 0
    keep_alive: bool = True
    first: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        values = [v for n, v in self.headers if n.lower() == lname]
        return ", ".join(values) if values else None

    def header_list(self, name: str) -> list[str]:
        """Comma-separated list header, split into stripped non-empty lower-cased items."""
        value = self.header(name)
        if value is None:
            return []
        return [item.strip().lower() for item in value.split(",") if item.strip()]

    def param(self, name: str) -> str | None:
        return self.first.get(name)


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _head_bytes(status: int, headers: Headers) -> bytes:
    lines = [f"HTTP/1.1 {status} {_reason(status)}\r\n"]
    lines.extend(f"{n}: {v}\r\n" for n, v in headers)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def _bad_head(kind: str, body: bytes) -> bytes:
    """A whole response (head and ``body``, delimited by closing) with a malformed head."""
    status, extra = BAD_HEADS[kind]
    if kind == "te_gzip":
        packed = zlib.compressobj(6, zlib.DEFLATED, 31)
        data = packed.compress(body) + packed.flush()
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    head = b"HTTP/1.1 %s Whatever\r\nContent-Type: application/octet-stream\r\n" % status
    return head + extra + b"Connection: close\r\n\r\n" + body


#: ``bad_head`` kinds: the status code as sent, and extra header lines.
BAD_HEADS: dict[str, tuple[bytes, bytes]] = {
    "status999": (b"999", b""),
    "status600": (b"600", b""),
    "status099": (b"099", b""),
    "ctl01": (b"200", b"X-Junk: a\x01b\r\n"),
    "ctl7f": (b"200", b"X-Junk: a\x7fb\r\n"),
    "cl_space": (b"200", b"Content-Length : 5\r\n"),
    "te_gzip": (b"200", b"Transfer-Encoding: gzip, chunked\r\n"),
}


def _std_headers(headers: Headers, keep_alive: bool, now: float) -> Headers:
    """`headers` with Date (stamped `now`), Server and, unless kept alive, Connection: close."""
    out = list(headers)
    out.append(("Date", email.utils.formatdate(now, usegmt=True)))
    out.append(("Server", _SERVER))
    if not keep_alive:
        out.append(("Connection", "close"))
    return out


def _http_date_ts(value: str) -> int | None:
    parsed = email.utils.parsedate_tz(value.strip())
    if parsed is None:
        return None
    try:
        return int(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def _etags(value: str) -> list[tuple[bool, str]] | None:
    """Parse an entity-tag list into (weak, opaque-tag) pairs; None if malformed."""
    out: list[tuple[bool, str]] = []
    pos = 0
    value = value.strip()
    while pos < len(value):
        m = _ETAG_RE.match(value, pos)
        if m is None or m.end() == pos:
            return None
        out.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return out


def _accepts_gzip(req: _Request) -> bool:
    star: float | None = None
    for item in req.header_list("accept-encoding"):
        coding, _, params = item.partition(";")
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        coding = coding.strip()
        if coding in ("gzip", "x-gzip"):
            return q > 0
        if coding == "*":
            star = q
    return star is not None and star > 0


def _parse_range(value: str, length: int) -> tuple[int, int] | Literal["ignore", "unsatisfiable"]:
    """Single byte range -> (start, stop_exclusive); multi/invalid -> "ignore"."""
    unit, sep, spec = value.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return "ignore"
    specs = [s.strip() for s in spec.split(",") if s.strip()]
    if len(specs) != 1:
        return "ignore"  # multiple ranges: serve the whole representation (RFC 9110 14.2)
    first, dash, last = specs[0].partition("-")
    first, last = first.strip(), last.strip()
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()):
        return "ignore"
    if not first:
        if not last:
            return "ignore"
        n = int(last)
        if n == 0 or length == 0:
            return "unsatisfiable"
        return max(0, length - n), length
    a = int(first)
    b = int(last) if last else None
    if b is not None and b < a:
        return "ignore"
    if a >= length:
        return "unsatisfiable"
    return a, length if b is None else min(b + 1, length)


class _Param(Exception):
    pass


def _q_size(req: _Request, name: str) -> int | None:
    value = req.param(name)
    if value is None or value == "":
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise _Param(f"bad {name}={value!r}") from None


def _q_flag(req: _Request, name: str) -> bool:
    value = req.param(name)
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _q_float(req: _Request, name: str) -> float | None:
    value = req.param(name)
    if value is None or value == "":
        return None
    try:
        f = float(value)
    except ValueError:
        raise _Param(f"bad {name}={value!r}") from None
    if not f >= 0 or f == float("inf"):
        raise _Param(f"bad {name}={value!r}")
    return f


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Core:
    """The asyncio server; lives entirely in one event loop."""

    def __init__(
        self,
        stats: _Stats,
        idle_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.stats = stats
        self.idle_timeout = idle_timeout
        self.tls = tls
        self.clock = clock
        """Seconds since the epoch, read for every Date and a changing Last-Modified."""
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False
        self._etag_counter = itertools.count(ETAG_CHANGES_START)

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=_LIMIT, backlog=1024, ssl=self.tls
        )
        sockname = self._server.sockets[0].getsockname()
        return int(sockname[1])

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for _ in range(3):  # let handlers of just-accepted connections start (and abort)
            await asyncio.sleep(0)
        tasks = list(self._conns)
        for task, writer in list(self._conns.items()):
            writer.transport.abort()
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    # ---- connection ------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closing:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        conn_id = self.stats.opened()
        self._conns[task] = writer
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = writer.get_extra_info("peername")
            client_port = int(peer[1]) if isinstance(peer, tuple) and len(peer) > 1 else 0
            action = await self._serve(reader, writer, conn_id, client_port)
            if action == "close":
                await self._graceful_close(reader, writer)
            elif action == "reset":
                await self._reset(writer)
            else:
                writer.transport.abort()
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            writer.transport.abort()
        except Exception:
            log.exception("origin: connection handler failed")
            writer.transport.abort()
        finally:
            self._conns.pop(task, None)
            if not writer.transport.is_closing():
                writer.transport.abort()
            self.stats.closed()

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn_id: int,
        client_port: int,
    ) -> Action:
        first = True
        while True:
            try:
                req = await self._read_request(reader, writer, first)
            except _BadRequest as exc:
                body = f"{exc}\n".encode()
                headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
                head = _std_headers(headers, False, self.clock())
                writer.write(_head_bytes(exc.status, head) + body)
                return "close"
            if req is None:
                return "abort"
            first = False
            self.stats.add(
                RequestRecord(
                    method=req.method,
                    target=req.target,
                    http_version=f"HTTP/{req.version[0]}.{req.version[1]}",
                    headers=list(req.headers),
                    client_port=client_port,
                    connection_id=conn_id,
                    body_length=req.body_length,
                )
            )
            try:
                action = await self._dispatch(req, reader, writer)
            except _Param as exc:
                action = await self._simple(writer, req, 400, f"{exc}\n".encode())
            if action != "keep":
                return action

    async def _readline(self, reader: asyncio.StreamReader) -> bytes | None:
        try:
            line = await reader.readline()
        except ValueError:  # line longer than the stream limit
            raise _BadRequest("request line or header too long", 431) from None
        if not line.endswith(b"\n"):
            return None  # EOF (possibly mid-line): the client went away
        return line[:-2] if line.endswith(b"\r\n") else line[:-1]

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first: bool
    ) -> _Request | None:
        line: bytes | None = b""
        for _ in range(4):  # tolerate a few empty lines before the request line
            if self.idle_timeout is not None:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        line = await self._readline(reader)
                except TimeoutError:
                    return None
            else:
                line = await self._readline(reader)
            if line is None:
                return None
            if line:
                break
        if not line:
            raise _BadRequest("no request line")
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            raise _BadRequest("malformed request line")
        method = m.group(1).decode("ascii")
        target = m.group(2).decode("ascii")
        version = (int(m.group(3)), int(m.group(4)))
        if version[0] != 1:
            raise _BadRequest("HTTP version not supported", 505)

        headers: Headers = []
        while True:
            hline = await self._readline(reader)
            if hline is None:
                return None
            if not hline:
                break
            if len(headers) >= _MAX_HEADERS:
                raise _BadRequest("too many headers", 431)
            if hline[:1] in (b" ", b"\t"):
                raise _BadRequest("obsolete line folding")
            name, colon, value = hline.partition(b":")
            if not colon or _TOKEN.fullmatch(name) is None:
                raise _BadRequest("malformed header line")
            svalue = value.strip(b" \t").decode("latin-1")
            if _BAD_VALUE.search(svalue):
                raise _BadRequest("invalid character in header value")
            headers.append((name.decode("ascii"), svalue))

        if target.startswith("/") or target.lower().startswith(("http://", "https://")):
            split = urlsplit(target)
        elif target == "*" and method == "OPTIONS":
            split = urlsplit("")
        else:
            raise _BadRequest("malformed request target")
        params = parse_qsl(split.query, keep_blank_values=True)
        path = split.path or "/"
        if path.startswith("/p/"):  # parameters in the path: a mirror's base URL's faults
            segment, _, rest = path[3:].partition("/")
            params = parse_qsl(segment, keep_blank_values=True) + params
            path = "/" + rest
            served = dict(parse_qsl(segment)).get("gen")
            if served is not None:  # any path below serves /gen/<size>
                path = f"/gen/{served}"
        first_params: dict[str, str] = {}
        for k, v in params:
            first_params.setdefault(k, v)
        req = _Request(
            method=method,
            target=target,
            version=version,
            headers=headers,
            path=path,
            params=params,
            first=first_params,
        )

        conn_tokens = req.header_list("connection")
        req.keep_alive = version >= (1, 1) and "close" not in conn_tokens
        te = req.header("transfer-encoding")
        cls = {v.strip() for v in req.header_list("content-length")}
        if te is not None:
            if cls:
                raise _BadRequest("both Content-Length and Transfer-Encoding")
            req.keep_alive = False  # body not read: cannot find the next request
        elif cls:
            if len(cls) != 1 or not next(iter(cls)).isdigit():
                raise _BadRequest("invalid Content-Length")
            length = int(next(iter(cls)))
            if length and version >= (1, 1) and "100-continue" in req.header_list("expect"):
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            remaining = length
            while remaining:
                data = await reader.read(min(remaining, 256 * 1024))
                if not data:
                    return None
                remaining -= len(data)
            req.body_length = length
        return req

    async def _graceful_close(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Flush, send FIN, wait (bounded) for the client's FIN, then close: no RST on close."""
        try:
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(_LINGER):
                while await reader.read(64 * 1024):
                    pass
        except (OSError, TimeoutError, asyncio.IncompleteReadError):
            pass
        writer.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(_LINGER):
                await writer.wait_closed()

    async def _wait_sent(self, writer: asyncio.StreamWriter) -> None:
        """Wait (bounded) until everything written has left asyncio and the kernel send queue."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _LINGER
        sock = writer.get_extra_info("socket")
        while loop.time() < deadline and not writer.transport.is_closing():
            pending = writer.transport.get_write_buffer_size()
            if not pending and _TIOCOUTQ is not None and sock is not None:
                try:
                    out = fcntl.ioctl(sock.fileno(), _TIOCOUTQ, b"\0\0\0\0")
                    pending = struct.unpack("i", out)[0]
                except OSError:
                    pending = 0
            if not pending:
                return
            await asyncio.sleep(0.001)

    async def _reset(self, writer: asyncio.StreamWriter) -> None:
        """Abort the connection with an RST (SO_LINGER on, timeout 0)."""
        await self._wait_sent(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _pass_gate(self, req: _Request) -> None:
        """Wait while the request's ``gate`` is closed (``Origin.close_gate``)."""
        name = req.param("gate")
        if name is None:
            return
        with self.stats.lock:
            gate = self.stats.gates.get(name)
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.01)

    @staticmethod
    async def _stall(reader: asyncio.StreamReader) -> None:
        """Send nothing until the client closes (or the server stops and cancels us)."""
        with contextlib.suppress(OSError):
            while await reader.read(64 * 1024):
                pass

    # ---- responses ---------------------------------------------------------------------------

    async def _simple(
        self,
        writer: asyncio.StreamWriter,
        req: _Request,
        status: int,
        body: bytes = b"",
        headers: Headers | None = None,
        content_type: str = "text/plain; charset=utf-8",
    ) -> Action:
        hdrs: Headers = list(headers or [])
        no_body = status in (204, 304) or 100 <= status < 200
        if not no_body:
            if not any(n.lower() == "content-type" for n, _ in hdrs):
                hdrs.insert(0, ("Content-Type", content_type))
            if not any(n.lower() == "content-length" for n, _ in hdrs):
                hdrs.append(("Content-Length", str(len(body))))
        data = _head_bytes(status, _std_headers(hdrs, req.keep_alive, self.clock()))
        if req.method != "HEAD" and not no_body:
            data += body
        writer.write(data)
        await writer.drain()
        return "keep" if req.keep_alive else "close"

    async def _dispatch(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Action:
        path = req.path
        hold = req.param("hold")
        if hold is not None:
            await self._held(hold)
        answer = req.param("answer")
        if answer is not None and answer.isdigit() and 200 <= int(answer) <= 599:
            status = int(answer)
            return await self._simple(writer, req, status, f"{status} {_reason(status)}\n".encode())
        if path.startswith("/gen/"):
            if req.method not in ("GET", "HEAD"):
                return await self._simple(
                    writer, req, 405, b"method not allowed\n", [("Allow", "GET, HEAD")]
                )
            return await self._gen(req, reader, writer)
        if path.startswith("/status/"):
            code = path[len("/status/") :]
            if not code.isdigit() or not 200 <= int(code) <= 599:
                return await self._simple(writer, req, 400, b"bad status code\n")
            status = int(code)
            return await self._simple(writer, req, status, f"{status} {_reason(status)}\n".encode())
        if path == "/redirect":
            to = req.param("to")
            code = req.param("code") or "302"
            if not to or _BAD_VALUE.search(to) or code not in ("301", "302", "303", "307", "308"):
                return await self._simple(writer, req, 400, b"bad redirect\n")
            return await self._simple(
                writer, req, int(code), f"redirecting to {to}\n".encode(), [("Location", to)]
            )
        if path == "/echo":
            doc = {
                "method": req.method,
                "target": req.target,
                "path": req.path,
                "query": [list(kv) for kv in req.params],
                "http_version": f"HTTP/{req.version[0]}.{req.version[1]}",
                "headers": [list(kv) for kv in req.headers],
                "body_length": req.body_length,
            }
            body = json.dumps(doc, indent=1).encode() + b"\n"
            return await self._simple(writer, req, 200, body, content_type="application/json")
        if path == "/links":
            proto = req.header("x-forwarded-proto") or "http"
            host = req.header("x-forwarded-host") or req.header("host") or "-"
            link = f"{proto}://{host}/gen/1k"
            if _BAD_VALUE.search(link):
                return await self._simple(writer, req, 400, b"bad forwarded host\n")
            cache_control = ("Cache-Control", req.param("cc") or "public, max-age=60")
            if _q_flag(req, "redirect"):
                return await self._simple(
                    writer, req, 302, b"elsewhere\n", [("Location", link), cache_control]
                )
            page = f'<a href="{link}">gen-1k</a>\n'.encode()
            return await self._simple(
                writer, req, 200, page, [cache_control], content_type="text/html"
            )
        if path == "/headers":
            extra: Headers = []
            for k, v in req.params:
                if k != "set":
                    continue
                name, colon, value = v.partition(":")
                name, value = name.strip(), value.strip()
                if not colon or not _TOKEN_S.fullmatch(name) or _BAD_VALUE.search(value):
                    return await self._simple(writer, req, 400, b"bad set= header\n")
                extra.append((name, value))
            return await self._simple(writer, req, 200, b"ok\n", extra)
        return await self._simple(writer, req, 404, b"not found\n")

    async def _held(self, name: str) -> None:
        """Wait while gate `name` is closed (``Origin.close_gate``)."""
        with self.stats.lock:
            gate = self.stats.gates.get(name)
        while gate is not None and not gate.is_set():
            await asyncio.sleep(0.01)

    async def _gen(
        self, req: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Action:
        try:
            size = parse_size(req.path[len("/gen/") :])
        except ValueError:
            return await self._simple(writer, req, 404, b"bad size\n")

        # -- faults before the response
        if _q_flag(req, "reset_headers"):
            return "reset"
        if _q_flag(req, "stall_headers"):
            await self._stall(reader)
            return "abort"
        trickle = _q_float(req, "trickle_headers")
        if trickle is not None:
            writer.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(TRICKLE_LINES):
                await writer.drain()
                await asyncio.sleep(trickle)
                writer.write(b"X-Trickle-%d: %d\r\n" % (i, i))
            return "close"
        bad_head = req.param("bad_head")
        if bad_head is not None:
            if bad_head not in BAD_HEADS:
                raise _Param(f"bad bad_head={bad_head!r}")
            writer.write(_bad_head(bad_head, body_bytes(min(size, 64 * 1024))))
            return "close"
        smuggle = _q_float(req, "smuggle")
        http10 = _q_flag(req, "http10")
        close_after = _q_size(req, "close_after")
        reset_after = _q_size(req, "reset_after")
        stall_after = _q_size(req, "stall_after")
        chunked_die = _q_size(req, "chunked_die")
        drop_once = _q_size(req, "drop_once")
        lie_length = _q_size(req, "lie_length")
        slow = _q_size(req, "slow")
        delay = _q_float(req, "delay")
        bad_framing = req.param("bad_framing")
        if bad_framing not in (None, "", "cl_te", "dup_cl", "bad_chunk"):
            raise _Param(f"bad bad_framing={bad_framing!r}")
        # -- continuation faults: a resume's own request stalls; an upstream ignoring If-Range
        if (
            _q_flag(req, "stall_resume_once")
            and req.header("range") is not None
            and self.stats.first_drop((req.path + "#resume", 0, req.param("key")))
        ):
            await self._stall(reader)
            return "abort"
        ignore_if_range = _q_flag(req, "ignore_if_range")
        bare_206 = _q_flag(req, "bare_206")
        version_s = req.param("v") or "1"
        if not version_s.isdigit():
            raise _Param(f"bad v={version_s!r}")
        version = int(version_s)
        # -- vkey: the version comes from the test (``Origin.set_version``), and the body
        # depends on it (it starts ``version`` bytes into the content), so versions differ.
        vkey = req.param("vkey")
        shift = 0
        if vkey is not None:
            with self.stats.lock:
                version = self.stats.versions.get(vkey, version)
            shift = version
        if delay:
            await asyncio.sleep(delay)
        if req.header("if-none-match") is not None or req.header("if-modified-since") is not None:
            await self._pass_gate(req)

        # -- representation
        drop_key = (req.path, version, req.param("key"))
        last_modified, lm_ts = LAST_MODIFIED, LAST_MODIFIED_TS
        etag_changes = _q_flag(req, "etag_changes")
        if etag_changes:
            version = next(self._etag_counter)
            lm_ts = int(self.clock())
            last_modified = email.utils.formatdate(lm_ts, usegmt=True)
        gzip_param = _q_flag(req, "gzip")
        use_gzip = gzip_param and size <= GZIP_MAX and _accepts_gzip(req)
        etag = f'"gen-{size}-v{version}{"-gz" if use_gzip else ""}"'
        rep: memoryview | None = None
        length = size
        if use_gzip:
            loop = asyncio.get_running_loop()
            rep = memoryview(await loop.run_in_executor(None, gzip_body, size))
            length = len(rep)
        validators: Headers = [
            ("ETag", etag),
            ("Last-Modified", last_modified),
            ("Cache-Control", req.param("cc") or _CACHE_CONTROL),
        ]
        repr_digest = req.param("repr_digest")
        if repr_digest in ("good", "bad") and not use_gzip:
            digest = hashlib.sha256(body_bytes(size + shift, shift)).digest()
            if repr_digest == "bad":
                digest = bytes(32)
            validators.append(("Repr-Digest", f"sha-256=:{base64.b64encode(digest).decode()}:"))
        if gzip_param and size <= GZIP_MAX:
            validators.append(("Vary", "Accept-Encoding"))
        elif req.param("vary"):
            validators.append(("Vary", req.param("vary") or ""))

        # -- conditionals (RFC 9110 13.2.2; If-Match/If-Unmodified-Since not implemented)
        inm = req.header("if-none-match")
        if inm is not None:
            if inm.strip() == "*":
                not_modified = True
            else:
                tags = _etags(inm) or []
                not_modified = any(tag == etag for _, tag in tags)  # weak comparison
        else:
            ims = req.header("if-modified-since")
            ims_ts = _http_date_ts(ims) if ims is not None else None
            # with etag_changes the object changes on every request: never "not modified"
            not_modified = ims_ts is not None and lm_ts <= ims_ts and not etag_changes
        if not_modified:
            return await self._simple(writer, req, 304, headers=validators)

        # -- range (GET only, RFC 9110 14.2)
        status, start, stop = 200, 0, length
        range_h = req.header("range")
        # with etag_changes the representation "changed" since any earlier response, so an
        # If-Range never matches (even a date from the same second)
        if_range_ok = self._if_range_ok(req, etag, lm_ts) and not (
            etag_changes and req.header("if-range") is not None
        )
        if_range_ok = if_range_ok or ignore_if_range
        if req.method == "GET" and range_h is not None and if_range_ok:
            parsed = _parse_range(range_h, length)
            if parsed == "unsatisfiable":
                return await self._simple(
                    writer,
                    req,
                    416,
                    headers=[*validators, ("Content-Range", f"bytes */{length}")],
                )
            if isinstance(parsed, tuple):
                status, (start, stop) = 206, parsed

        # -- framing
        headers: Headers = [("Content-Type", "application/octet-stream")]
        count = stop - start
        chunked = False
        bad_chunk = False
        force_close = False
        if bad_framing == "cl_te":
            headers += [("Content-Length", str(count)), ("Transfer-Encoding", "chunked")]
            chunked = force_close = True
        elif bad_framing == "dup_cl":
            headers += [("Content-Length", str(count)), ("Content-Length", str(count + 1))]
            force_close = True
        elif bad_framing == "bad_chunk":
            headers.append(("Transfer-Encoding", "chunked"))
            bad_chunk = force_close = True
        elif lie_length is not None:
            headers.append(("Content-Length", str(lie_length)))
            force_close = True
        elif http10:
            force_close = True  # HTTP/1.0 without a length: delimited by closing
        elif chunked_die is not None or req.param("cl") == "0":
            if req.version >= (1, 1):
                headers.append(("Transfer-Encoding", "chunked"))
                chunked = True
            else:
                force_close = True  # HTTP/1.0: delimited by closing the connection
        else:
            headers.append(("Content-Length", str(count)))
        if bare_206 and status == 206:
            headers += [(k, v) for k, v in validators if k not in ("ETag", "Last-Modified")]
        else:
            headers += validators
        headers.append(("Accept-Ranges", "bytes"))
        if status == 206:
            headers.append(("Content-Range", f"bytes {start}-{stop - 1}/{length}"))
        content_digest = req.param("content_digest")
        if content_digest in ("good", "bad") and not use_gzip:
            digest = hashlib.sha256(body_bytes(stop + shift, start + shift)).digest()
            if content_digest == "bad":
                digest = bytes(32)
            headers.append(("Content-Digest", f"sha-256=:{base64.b64encode(digest).decode()}:"))
        if use_gzip:
            headers.append(("Content-Encoding", "gzip"))

        # -- body faults: the smallest cut wins
        cuts: list[tuple[int, Action]] = []
        if req.method == "GET":
            candidates: tuple[tuple[int | None, Action], ...] = (
                (reset_after, "reset"),
                (close_after, "close"),
                (stall_after, "abort"),
                (chunked_die, "close"),
            )
            for n, act in candidates:
                if n is not None:
                    cuts.append((n, act))
            if drop_once is not None and self.stats.first_drop(drop_key):
                cuts.append((drop_once, "close"))
        cut: tuple[int, Action] | None = min(cuts, key=lambda c: c[0]) if cuts else None
        if cut is not None or chunked_die is not None:
            force_close = True
        keep = req.keep_alive and not force_close
        head = _head_bytes(status, _std_headers(headers, keep, self.clock()))
        if http10:
            head = b"HTTP/1.0" + head[len(b"HTTP/1.1") :]
        writer.write(head)
        if req.method == "HEAD":
            await writer.drain()
            return "keep" if keep else "close"
        if bad_chunk:
            writer.write(b"zz\r\n")
            return "close"

        # -- body
        send_stop = stop if cut is None else min(stop, start + cut[0])
        chunk = CHUNK if not slow else max(1, min(CHUNK, slow // 10))
        if rep is None:
            pieces: Iterator[memoryview] = _slices(start + shift, send_stop + shift, chunk)
        else:
            pieces = (rep[i : min(i + chunk, send_stop)] for i in range(start, send_stop, chunk))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        sent = 0
        write = writer.write
        drain = writer.drain
        pause_after = _q_size(req, "pause_after")
        written = 0
        for piece in pieces:
            if pause_after is not None and written >= pause_after:
                pause_after = None
                await drain()
                await self._held(req.param("gate") or "")
            written += len(piece)
            # Counted before the write: the socket send inside it lets a client thread read
            # the bytes (and a test read the count) before the next line of this thread runs.
            self.stats.body_bytes += len(piece)
            if chunked:
                write(b"%x\r\n" % len(piece))
                write(piece)
                write(b"\r\n")
            else:
                write(piece)
            await drain()
            if slow:
                sent += len(piece)
                wait = t0 + sent / slow - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
        if chunked and cut is None and chunked_die is None:
            write(b"0\r\n\r\n")
        if cut is not None:
            if cut[1] == "abort":  # stall_after
                await drain()
                await self._stall(reader)
            return cut[1]
        await drain()
        if smuggle is not None and keep:
            await asyncio.sleep(smuggle)
            await self._pass_gate(req)
            write(SMUGGLED)
            await drain()
        return "keep" if keep else "close"

    @staticmethod
    def _if_range_ok(req: _Request, etag: str, lm_ts: int) -> bool:
        value = req.header("if-range")
        if value is None:
            return True
        value = value.strip()
        if value.startswith(('"', "W/")):
            return value == etag  # strong comparison; weak tags never match
        ts = _http_date_ts(value)
        return ts is not None and ts == lm_ts


# --------------------------------------------------------------------------------------------
# Running it
# --------------------------------------------------------------------------------------------


class Origin(LoopbackServer):
    """The origin server in a background daemon thread with its own event loop.

    ``start()`` returns once listening; ``stop()`` closes every connection (stalls included)
    and joins the thread.  Introspection (``requests``, ``open_connections``,
    ``total_connections``, ``reset_stats()``) is thread-safe.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        record: bool = True,
        idle_timeout: float | None = None,
        tls: ssl.SSLContext | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`tls`: a server-side context; the origin then speaks https. `clock`: the time
        its Date headers (and `etag_changes`' Last-Modified) are stamped with; settable
        later (`monkeypatch.setattr(origin, "clock", manual.now)`: the session shares one
        origin), so a test moving a relay's `ManualClock` moves the origin's time with it
        instead of sleeping."""
        self.clock = clock
        self.host = host
        self._tls = tls
        self.port = port
        self._stats = _Stats(record)
        self._idle_timeout = idle_timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{host}:{self.port}"

    def url_for(self, path: str, **params: str | int | float) -> str:
        """``url_for("/gen/1m", close_after=10)`` -> ``http://127.0.0.1:PORT/gen/1m?close_after=10``."""
        query = f"?{urlencode(params)}" if params else ""
        return f"{self.url}{path}{query}"

    # ---- lifecycle -----------------------------------------------------------------------

    def start(self) -> Origin:
        if self._thread is not None:
            raise RuntimeError("Origin already started")
        self._thread = threading.Thread(target=self._run, name="test-origin", daemon=True)
        LoopbackServer.started()
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        thread, loop, event = self._thread, self._loop, self._stop_event
        if thread is None:
            return
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(event.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError("origin thread did not stop")

    def __enter__(self) -> Origin:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        finally:
            try:
                _cancel_all(loop)
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(loop.shutdown_default_executor())
            finally:
                loop.close()

    async def _main(self) -> None:
        try:
            self._stop_event = asyncio.Event()
            core = _Core(self._stats, self._idle_timeout, self._tls, lambda: self.clock())
            self.port = await core.start(self.host, self.port)
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await core.close()

    # ---- introspection -------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """A snapshot of every request received (since start / the last ``reset_stats()``)."""
        with self._stats.lock:
            return list(self._stats.requests)

    @property
    def open_connections(self) -> int:
        with self._stats.lock:
            return self._stats.open

    @property
    def body_bytes(self) -> int:
        """/gen body bytes written to clients (since start / the last ``reset_stats()``)."""
        return self._stats.body_bytes

    @property
    def total_connections(self) -> int:
        with self._stats.lock:
            return self._stats.total

    def set_version(self, vkey: str, version: int) -> None:
        """From now on ``/gen/...?vkey=<vkey>`` serves `version` (ETag and body)."""
        with self._stats.lock:
            self._stats.versions[vkey] = version

    def close_gate(self, name: str) -> None:
        """Conditional requests (If-None-Match / If-Modified-Since) to ``/gen/...?gate=<name>``,
        and any request with ``hold=<name>``, wait, after being recorded, until
        ``open_gate(name)``."""
        with self._stats.lock:
            self._stats.gates[name] = threading.Event()

    def open_gate(self, name: str) -> None:
        with self._stats.lock:
            gate = self._stats.gates.get(name)
        if gate is not None:
            gate.set()

    def reset_stats(self) -> None:
        """Clear recorded requests, ``total_connections``, ``body_bytes`` and the ``drop_once``
        memory."""
        self._stats.reset()

    def wait_for(self, predicate: Callable[[Origin], bool], timeout: float = 5.0) -> bool:
        """Poll ``predicate(self)`` until true or ``timeout``; e.g. for ``open_connections == 0``
        (the server sees a client's close asynchronously)."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))


async def _serve_forever(host: str, port: int, idle_timeout: float | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):  # Windows
            loop.add_signal_handler(sig, stop.set)
    core = _Core(_Stats(record=False), idle_timeout)
    bound = await core.start(host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"test origin listening on http://{shown}:{bound}", flush=True)
    try:
        await stop.wait()
    finally:
        await core.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.origin", description="Fault-injecting HTTP/1.1 test origin."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument(
        "--idle-timeout", type=float, default=None, help="close idle keep-alive connections"
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args.host, args.port, args.idle_timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
