"""The cache model's origin (tests/cache/test_model.py): a deterministic origin behind
`httpx.MockTransport` whose every body says what it is.

Every body is made of 16-byte records, `P<pid>v<version><variant><n>\\n`, so any window of any
body (a range, a slice file on disk) says which object, version and representation it is and
where it sits: an answer is judged by its bytes and its `ETag` alone, without modelling how
relay stores things.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import hashlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

RECORD = 16
CHUNK = 16 * 1024
ROUTE_PREFIX = "/o/"
ORIGIN = "http://origin.test/"
ADMIN_TOKEN = "model-admin-token"
HOSTS = {"relay.test": "r", "evil.test": "a"}
"""Client Host header -> the variant letter a host-dependent ("links") body carries."""
NO_HOST = "n"
"""The variant letter of a links body built without any X-Forwarded-Host."""

# ---- bodies ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def body_of(pid: int, version: int, variant: str, size: int) -> bytes:
    """The bytes of one representation: records naming (pid, version, variant, index)."""
    count = (size + RECORD - 1) // RECORD
    data = b"".join(f"P{pid:02d}v{version:03d}{variant}{i:07d}\n".encode() for i in range(count))
    return data[:size]


_RECORD_RE = re.compile(rb"P(\d\d)v(\d\d\d)([a-z])(\d{7})\n")


def parse_record(record: bytes) -> tuple[int, int, str, int] | None:
    """(pid, version, variant, record index) of a 16-byte record, or None."""
    m = _RECORD_RE.fullmatch(record)
    if m is None:
        return None
    return int(m[1]), int(m[2]), m[3].decode(), int(m[4])


def sha256_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def http_date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


def parse_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None


ETAG_RE = re.compile(r'"p(\d+)-v(\d+)(?:-([a-z]))?"')


def etag_of(pid: int, version: int, suffix: str = "") -> str:
    return f'"p{pid}-v{version}-{suffix}"' if suffix else f'"p{pid}-v{version}"'


def parse_etag(value: str | None) -> tuple[int, int, str] | None:
    m = ETAG_RE.fullmatch((value or "").strip())
    if m is None:
        return None
    return int(m[1]), int(m[2]), m[3] or ""


def etag_list(value: str | None) -> list[str]:
    """The entity tags of an If-None-Match value, weak markers dropped (weak comparison)."""
    if not value:
        return []
    return [
        t.strip().removeprefix("W/") for t in value.split(",") if t.strip() and t.strip() != "*"
    ]


# ---- the origin --------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """An object the origin serves: chosen by the strategy, fixed for a run (its cache
    directives may change with a version bump or a `restrict`)."""

    pid: int
    kind: str
    """"plain"; "vary" (Vary: Accept-Encoding, gzip for clients that accept it); "links" (a
    page whose bytes depend on the X-Forwarded-Host it was built for, one ETag for all)."""
    size: int
    cache_control: str
    chunked: bool = False
    """No Content-Length on 200s (Transfer-Encoding: chunked)."""
    digest: bool = False
    """Repr-Digest (sha-256) on 200s and 206s, Content-Digest on 206s."""
    last_modified: bool = True


@dataclass
class Version:
    number: int
    size: int
    cache_control: str
    modified: float


@dataclass
class Exchange:
    """One request the origin answered (or refused)."""

    seq: int
    pid: int
    time: float
    method: str
    request: httpx.Headers
    status: int
    """0: refused (connection error)."""
    etag: str | None = None
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    failing: bool = False
    """An error status, a refused connection or a body cut short."""
    sent: int = 0
    """Body bytes the origin sent (up to a cut)."""


class CutBody(httpx.AsyncByteStream):
    """A response body in CHUNK pieces that raises ReadError after `cut` bytes (if set)."""

    def __init__(self, origin: Origin, data: bytes, cut: int | None) -> None:
        self._origin = origin
        self._data = data
        self._cut = cut
        self.closed = False
        origin.open_bodies.add(self)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        data = self._data if self._cut is None else self._data[: self._cut]
        for start in range(0, len(data), CHUNK):
            yield data[start : start + CHUNK]
            await asyncio.sleep(0)
        if self._cut is not None:
            raise httpx.ReadError("origin cut the body")

    async def aclose(self) -> None:
        self.closed = True
        self._origin.open_bodies.discard(self)


class Origin:
    """A deterministic origin behind `httpx.MockTransport`: objects with versions, modes
    ("ok", "error" 503, "refuse" connection error, "cut" body cut after `cut_at` bytes, "liar"
    304 with the current ETag to any conditional request), Range/If-Range, conditionals."""

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.specs: dict[int, ObjectSpec] = {}
        self.versions: dict[int, list[Version]] = {}
        self.mode: dict[int, str] = {}
        self.cut_at: dict[int, int] = {}
        self.log: list[Exchange] = []
        self.open_bodies: set[CutBody] = set()
        self.gates: dict[int, asyncio.Event] = {}
        self.arrived: dict[int, asyncio.Event] = {}

    # ---- the script ----

    def add(self, spec: ObjectSpec) -> None:
        self.specs[spec.pid] = spec
        now = self.clock.now()
        self.versions[spec.pid] = [Version(1, spec.size, spec.cache_control, now - 3600)]
        self.mode[spec.pid] = "ok"

    def current(self, pid: int) -> Version:
        return self.versions[pid][-1]

    def version(self, pid: int, number: int) -> Version | None:
        for v in self.versions.get(pid, []):
            if v.number == number:
                return v
        return None

    def bump(self, pid: int, size: int, cache_control: str) -> Version:
        number = self.current(pid).number + 1
        version = Version(number, size, cache_control, self.clock.now())
        self.versions[pid].append(version)
        return version

    def restrict(self, pid: int, directive: str) -> None:
        """The current version's headers change (same bytes, same ETag)."""
        self.current(pid).cache_control = directive

    def count(self, pid: int) -> int:
        return sum(1 for e in self.log if e.pid == pid)

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # ---- answering ----

    def representation(self, spec: ObjectSpec, request: httpx.Request) -> tuple[str, str]:
        """(variant letter, ETag suffix) the request selects."""
        if spec.kind == "vary":
            gzip = "gzip" in request.headers.get("accept-encoding", "").lower()
            return ("g", "g") if gzip else ("i", "i")
        if spec.kind == "links":
            host = request.headers.get("x-forwarded-host")
            return (HOSTS.get(host, "x") if host else NO_HOST), ""
        return "i", ""

    async def handle(self, request: httpx.Request) -> httpx.Response:
        m = re.fullmatch(r"/p(\d+)", request.url.path)
        if m is None or int(m[1]) not in self.specs:
            return httpx.Response(
                404, headers={"content-length": "9"}, stream=CutBody(self, b"not found", None)
            )
        pid = int(m[1])
        gate = self.gates.get(pid)
        if gate is not None:
            self.arrived.setdefault(pid, asyncio.Event()).set()
            await gate.wait()
        spec = self.specs[pid]
        now = self.clock.now()
        exchange = Exchange(len(self.log), pid, now, request.method, request.headers, 0)
        self.log.append(exchange)
        mode = self.mode[pid]
        if mode == "refuse":
            exchange.failing = True
            raise httpx.ConnectError("origin refused the connection", request=request)
        if mode == "error":
            exchange.status = 503
            exchange.failing = True
            body = b"busy"
            return httpx.Response(
                503, headers={"content-length": str(len(body))}, stream=CutBody(self, body, None)
            )
        version = self.current(pid)
        variant, suffix = self.representation(spec, request)
        etag = etag_of(pid, version.number, suffix)
        data = body_of(pid, version.number, variant, version.size)
        headers = httpx.Headers({"etag": etag, "date": http_date(now)})
        if version.cache_control:
            headers["cache-control"] = version.cache_control
        if spec.last_modified:
            headers["last-modified"] = http_date(version.modified)
        if spec.kind == "vary":
            headers["vary"] = "Accept-Encoding"
        if variant == "g":
            headers["content-encoding"] = "gzip"
        exchange.etag = etag
        exchange.headers = headers
        if self._not_modified(request, etag, version, mode):
            exchange.status = 304
            return httpx.Response(304, headers=headers, stream=CutBody(self, b"", None))
        headers["accept-ranges"] = "bytes"
        headers["content-type"] = "application/octet-stream"
        if spec.digest:
            headers["repr-digest"] = f"sha-256=:{sha256_b64(data)}:"
        status, start, stop = self._range(request, etag, version, len(data))
        if status == 416:
            exchange.status = 416
            headers["content-range"] = f"bytes */{len(data)}"
            headers["content-length"] = "0"
            return httpx.Response(416, headers=headers, stream=CutBody(self, b"", None))
        part = data[start:stop]
        if status == 206:
            headers["content-range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            if spec.digest:
                headers["content-digest"] = f"sha-256=:{sha256_b64(part)}:"
        if spec.chunked and status == 200:
            headers["transfer-encoding"] = "chunked"
        else:
            headers["content-length"] = str(len(part))
        exchange.status = status
        if request.method == "HEAD":
            return httpx.Response(status, headers=headers, stream=CutBody(self, b"", None))
        cut = None
        if mode == "cut" and part:
            cut = min(self.cut_at.get(pid, 0), len(part) - 1)
            exchange.failing = True
        exchange.sent = len(part) if cut is None else cut
        return httpx.Response(status, headers=headers, stream=CutBody(self, part, cut))

    def _not_modified(self, request: httpx.Request, etag: str, version: Version, mode: str) -> bool:
        inm = request.headers.get("if-none-match")
        ims = request.headers.get("if-modified-since")
        if request.method not in ("GET", "HEAD") or (inm is None and ims is None):
            return False
        if mode == "liar":
            return True  # 304 carrying the current ETag, whatever was asked
        if inm is not None:
            return inm.strip() == "*" or etag in etag_list(inm)
        since = parse_date(ims)
        return since is not None and version.modified <= since

    def _range(
        self, request: httpx.Request, etag: str, version: Version, size: int
    ) -> tuple[int, int, int]:
        value = request.headers.get("range")
        whole = (200, 0, size)
        if value is None or request.method != "GET":
            return whole
        if_range = request.headers.get("if-range")
        if if_range is not None:
            if if_range.startswith('"'):
                if if_range != etag:
                    return whole
            elif parse_date(if_range) != version.modified:
                return whole
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", value.replace(" ", ""))
        if m is None or (not m[1] and not m[2]):
            return whole
        if not m[1]:
            suffix = int(m[2])
            if suffix == 0:
                return 416, 0, 0
            return 206, max(0, size - suffix), size
        start = int(m[1])
        if start >= size:
            return 416, 0, 0
        stop = size if not m[2] else min(size, int(m[2]) + 1)
        if stop <= start:
            return whole
        return 206, start, stop
