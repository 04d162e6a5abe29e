"""The parts of the cache's model-based test (tests/cache/test_model.py): a scripted origin, a
client that can leave mid-body, the checks every answer must pass, and what the app must have
released once it settles.

Every body the origin sends is made of 16-byte records, `P<pid>v<version><variant><n>\\n`, so
any window of any body (a range, a slice file on disk) says which object, version and
representation it is and where it sits: an answer is judged by its bytes and its `ETag` alone,
without modelling how relay stores things.

The reference model is deliberately small: the origin's history. For each representation
(ETag) it records when the origin confirmed it (a 200/206 carrying it, or a 304 naming it) and
with which headers. An answer relay gives without asking the origin is legitimate only if one
such confirmation still allows it under RFC 9111 / RFC 5861 (fresh, or within
stale-while-revalidate, or within stale-if-error while the origin fails) and no later 304 that
relay itself asked for made the representation private/no-store. Everything else is a
property of the single answer (bytes, headers, statuses) or of the app at rest.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import functools
import hashlib
import os
import re
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette

from relay.cache.policy import directives
from relay.errors import TransferAborted
from tests.asgi import Message, http_scope

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


# ---- the client ----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one client saw."""

    method: str
    path: str
    pid: int
    request: httpx.Headers
    host: str
    started: float
    window: tuple[int, int] = (0, 0)
    """The origin log's indices [first, last) while this request ran."""
    status: int = 0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    body: bytes = b""
    completed: bool = False
    relay_aborted: bool = False
    client_left: bool = False
    escaped: str | None = None
    """An exception other than TransferAborted that came out of the app."""

    def describe(self) -> str:
        wanted = " ".join(f"{k}: {v}" for k, v in self.request.items() if k != "host")
        shape = (
            f"{self.status} {len(self.body)} bytes"
            + (" completed" if self.completed else "")
            + (" relay-aborted" if self.relay_aborted else "")
            + (" client-left" if self.client_left else "")
        )
        return (
            f"{self.method} {self.path} [{wanted}] host={self.host} -> {shape}; "
            f"etag={self.headers.get('etag')} content-range={self.headers.get('content-range')}"
            f" age={self.headers.get('age')} cache-status={self.headers.get('cache-status')}"
        )


class Probe:
    """An ASGI client: records messages; leaves after `leave_after` body bytes, either by
    reporting a disconnect on receive (ASGI 2.3) or by raising OSError from send (2.4)."""

    def __init__(self, leave_after: int | None = None, style: str = "disconnect") -> None:
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.received = 0
        self.completed = False
        self.left = False
        self._leave_after = leave_after
        self._style = style
        self._gone = asyncio.Event()
        self._asked = False

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.left:
            raise OSError("client gone")
        kind = message["type"]
        if kind == "http.response.start":
            assert self.start is None, "two response starts"
            self.start = message
        elif kind == "http.response.body":
            assert not self.completed, "body after the end of the response"
            body = message.get("body", b"")
            if body:
                self.chunks.append(body)
                self.received += len(body)
            if not message.get("more_body", False):
                self.completed = True
            if self._leave_after is not None and self.received >= self._leave_after:
                self.left = True
                self._gone.set()
                if self._style == "raise":
                    raise OSError("client disconnected")
        await asyncio.sleep(0)


async def call(
    app: Starlette,
    state: dict[str, Any],
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    *,
    leave_after: int | None = None,
    style: str = "disconnect",
    query: str = "",
) -> tuple[Probe, str | None, bool]:
    """Run one request through the app: (probe, escaped exception, relay aborted)."""
    probe = Probe(leave_after, style)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    scope = http_scope(
        state,
        path,
        method=method,
        headers=raw,
        query=query.encode(),
        spec_version="2.4" if style == "raise" else "2.3",
    )
    escaped: str | None = None
    aborted = False
    try:
        await app(scope, probe.receive, probe.send)
    except TransferAborted:
        aborted = True
    except OSError:
        if not probe.left:
            escaped = "OSError"
    except Exception as exc:
        escaped = f"{type(exc).__name__}: {exc}"
    return probe, escaped, aborted


# ---- the reference checks ----------------------------------------------------------------------

HEURISTIC_FRACTION = 0.1
HEURISTIC_CAP = 24 * 3600.0
SHORT_ERROR_BODY = 512


def lifetime_of(headers: httpx.Headers) -> float:
    """RFC 9111 4.2.1 for a shared cache (s-maxage > max-age > Expires > heuristic)."""
    cc = directives(headers.get_list("cache-control"))
    for name in ("s-maxage", "max-age"):
        if name in cc:
            value = cc[name]
            return float(value) if value.isdigit() else 0.0
    date = parse_date(headers.get("date"))
    modified = parse_date(headers.get("last-modified"))
    if date is not None and modified is not None and date > modified:
        return min(HEURISTIC_CAP, (date - modified) * HEURISTIC_FRACTION)
    return 0.0


def may_answer_from_store(headers: httpx.Headers, age: float, failing: bool) -> bool:
    """Whether a response stored with `headers`, `age` seconds after the origin confirmed it,
    may answer a request without a successful validation (RFC 9111 3, 4.2, 5.2.2; RFC 5861).
    Permissive where the RFCs leave room; never stricter than them."""
    cc = directives(headers.get_list("cache-control"))
    if "no-store" in cc or "private" in cc:
        return False  # a shared cache never stored it
    lifetime = lifetime_of(headers)
    if "no-cache" not in cc and age < lifetime:
        return True
    if "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc:
        # s-maxage carries proxy-revalidate for a shared cache (RFC 9111 5.2.2.10).
        return False
    staleness = age - lifetime
    swr = cc.get("stale-while-revalidate", "")
    if "no-cache" not in cc and swr.isdigit() and staleness <= int(swr):
        return True
    sie = cc.get("stale-if-error", "")
    return failing and sie.isdigit() and staleness <= int(sie)


@dataclass
class Violation:
    name: str
    """A key of test_model.CHECKS (its KNOWN_BUGS switch, if any, has the same key)."""
    detail: str


@dataclass
class Tamper:
    pid: int
    version: int
    variant: str
    offset: int
    """Offset in the whole representation."""
    value: int


class Judge:
    """Checks each answer against the origin's history (see the module docstring)."""

    def __init__(self, origin: Origin, slice_bytes: int) -> None:
        self.origin = origin
        self.slice_bytes = slice_bytes
        self.confirmed: dict[str, list[tuple[float, httpx.Headers]]] = {}
        """ETag -> (time, headers) of each origin answer confirming it."""
        self.restricted: dict[str, float] = {}
        """ETag -> when a 304 relay asked for made it private/no-store/no-cache."""
        self.purged_at: dict[int, int] = {}
        """pid -> origin log length when it was purged (cleared once the origin is asked)."""
        self.tampered: list[Tamper] = []
        self._seen = 0

    def absorb(self, forwarded_inm: Iterable[str | None]) -> None:
        """Learn from the origin's new exchanges; `forwarded_inm`: If-None-Match values
        clients sent meanwhile (a 304 answering one of them may be the client's own, relayed)."""
        clients = {v for v in forwarded_inm if v}
        for exchange in self.origin.log[self._seen :]:
            if exchange.etag is None or exchange.status not in (200, 206, 304):
                continue
            entry = (exchange.time, exchange.headers)
            self.confirmed.setdefault(exchange.etag, []).append(entry)
            cc = directives(exchange.headers.get_list("cache-control"))
            restricting = {"private", "no-store", "no-cache"} & set(cc)
            asked_by_relay = exchange.request.get("if-none-match") not in clients
            if exchange.status == 304 and restricting and asked_by_relay:
                self.restricted[exchange.etag] = exchange.time
        self._seen = len(self.origin.log)

    def _may_abort(self, out: Outcome, etag: str) -> bool:
        """Whether relay had a reason to abort: the origin failed, the object has another
        version it may have stored parts of, or a stored copy was tampered with."""
        mine = [e for e in self.origin.log[out.window[0] : out.window[1]] if e.pid == out.pid]
        others = {e for e in self.confirmed if e != etag and e.startswith(f'"p{out.pid}-')}
        return (
            any(e.failing for e in mine)
            or self.origin.mode.get(out.pid) != "ok"
            or bool(others)
            or any(t.pid == out.pid for t in self.tampered)
        )

    # ---- one answer ----

    def judge(self, out: Outcome) -> list[Violation]:
        found: list[Violation] = []

        def fail(name: str, why: str) -> None:
            found.append(Violation(name, f"{why}\n      {out.describe()}"))

        window = self.origin.log[out.window[0] : out.window[1]]
        mine = [e for e in window if e.pid == out.pid]
        failing = any(e.failing for e in mine) or self.origin.mode.get(out.pid) != "ok"
        if out.escaped is not None:
            fail("no-exception", f"an exception escaped the app: {out.escaped}")
            return found
        if out.status == 0:
            if not out.relay_aborted and not out.client_left:
                fail("answered", "the app returned without starting a response")
            return found
        status = out.status
        if status >= 500:
            if status not in (502, 503, 504):
                fail("status", f"status {status}")
            elif not failing:
                fail("5xx-needs-upstream-trouble", f"{status} although the origin answered fine")
            if len(out.body) > SHORT_ERROR_BODY:
                fail("status", "a long error body")
            return found
        if status not in (200, 206, 304, 416):
            fail("status", f"unexpected status {status}")
            return found
        if status == 416:
            if "range" not in out.request:
                fail("status", "416 without a Range")
            return found
        etag = out.headers.get("etag")
        parsed = parse_etag(etag)
        if parsed is None or parsed[0] != out.pid:
            fail("headers", f"ETag {etag!r} names no version of this object")
            return found
        assert etag is not None
        _, number, suffix = parsed
        version = self.origin.version(out.pid, number)
        if version is None:
            fail("headers", f"ETag {etag} names a version the origin never had")
            return found
        # Based on an answer the origin gave meanwhile: that confirmation is now, so Age is 0
        # (a stale copy sent while a background revalidation ran is not).
        age = out.headers.get("age")
        from_origin = any(e.etag == etag and e.status in (200, 206, 304) for e in mine) and (
            age is None or age == "0"
        )
        if status == 304:
            self._judge_304(out, etag, version, mine, fail)
        else:
            self._judge_body(out, etag, version, suffix, fail)
            inm = out.request.get("if-none-match")
            if inm is not None and etag in etag_list(inm):
                fail(
                    "if-none-match-honoured",
                    f"{status} for a client whose If-None-Match lists {etag}",
                )
        if not from_origin:
            self._judge_from_store(out, etag, failing, bool(mine), fail)
        if age is not None and not from_origin:
            ages = {int(out.started - c) for c, _ in self.confirmed.get(etag, [])}
            if not age.isdigit() or int(age) not in ages | {0}:
                fail(
                    "age",
                    f"Age {age}, not the time since any confirmation of {etag} {sorted(ages)}",
                )
        status_header = out.headers.get("cache-status", "")
        if "stored" in status_header and out.relay_aborted:
            fail("cache-status-stored", "Cache-Status says stored on a transfer relay aborted")
        return found

    def _judge_from_store(
        self, out: Outcome, etag: str, failing: bool, asked: bool, fail: Any
    ) -> None:
        if out.pid in self.purged_at and not asked:
            fail("purge", f"answered {etag} without asking the origin after a purge")
        since = self.restricted.get(etag)
        allowed = [
            (c, h)
            for c, h in self.confirmed.get(etag, [])
            if (since is None or c >= since) and may_answer_from_store(h, out.started - c, failing)
        ]
        if not allowed:
            times = [
                (int(out.started - c), h.get("cache-control"))
                for c, h in self.confirmed.get(etag, [])
            ]
            why = (
                f"{etag} answered from the store without asking the origin; "
                f"confirmations (age, cache-control): {times}"
            )
            if since is not None:
                why += f"; made private/no-store by a 304 {int(out.started - since)} s ago"
            fail("freshness", why)

    def _judge_304(
        self, out: Outcome, etag: str, version: Version, mine: list[Exchange], fail: Any
    ) -> None:
        inm = out.request.get("if-none-match")
        ims = out.request.get("if-modified-since")
        relayed = any(
            e.status == 304 and inm is not None and e.request.get("if-none-match") == inm
            for e in mine
        )
        if relayed:
            return  # the origin's own 304 to the client's own condition, passed on
        if inm is None and ims is None:
            fail("not-modified", "304 to an unconditional request")
        elif inm is not None:
            if inm.strip() != "*" and etag not in etag_list(inm):
                fail("not-modified", f"304 naming {etag}, not in If-None-Match {inm}")
        else:
            since = parse_date(ims)
            if since is None or version.modified > since:
                fail("not-modified", f"304 for If-Modified-Since {ims}; {etag} modified later")
        if out.body:
            fail("headers", "a 304 with a body")

    def _judge_body(
        self, out: Outcome, etag: str, version: Version, suffix: str, fail: Any
    ) -> None:
        spec = self.origin.specs[out.pid]
        encoding = out.headers.get("content-encoding", "")
        if spec.kind == "vary":
            variants = ["g" if encoding == "gzip" else "i"]
            if (suffix == "g") != (encoding == "gzip"):
                fail("headers", f"Content-Encoding {encoding!r} under {etag}")
            accepted = "gzip" in out.request.get("accept-encoding", "")
            if encoding == "gzip" and not accepted:
                fail("poisoning", "gzip bytes for a client that did not accept gzip")
        elif spec.kind == "links":
            variants = [NO_HOST, HOSTS[out.host]]
        else:
            variants = ["i"]
        total = version.size
        start, stop = 0, total
        if out.status == 206:
            m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", out.headers.get("content-range", ""))
            if m is None:
                fail("headers", "206 without a valid Content-Range")
                return
            start, stop = int(m[1]), int(m[2]) + 1
            if int(m[3]) != total:
                fail("wrong-bytes", f"Content-Range total {m[3]}, {etag} has {total} bytes")
            asked = re.fullmatch(
                r"bytes=(\d*)-(\d*)", out.request.get("range", "").replace(" ", "")
            )
            if asked is not None and asked[1]:
                want_start = int(asked[1])
                want_stop = min(total, int(asked[2]) + 1) if asked[2] else total
                if (start, stop) != (want_start, want_stop):
                    fail(
                        "wrong-bytes",
                        f"206 of [{start}, {stop}) for a Range of [{want_start}, {want_stop})",
                    )
        if out.method == "HEAD":
            length = out.headers.get("content-length")
            if length is not None and int(length) != stop - start:
                fail("headers", f"HEAD Content-Length {length}, the object has {stop - start}")
            return
        length = out.headers.get("content-length")
        if length is not None and int(length) != stop - start:
            fail("headers", f"Content-Length {length} for {stop - start} bytes")
        if out.completed and len(out.body) != stop - start:
            fail("clean-short-body", f"ended cleanly after {len(out.body)} of {stop - start} bytes")
        if not out.completed and not out.relay_aborted and not out.client_left:
            fail("answered", "the body never ended (neither completed nor aborted)")
        if out.relay_aborted and not self._may_abort(out, etag):
            fail("needless-abort", "relay aborted a transfer the origin served whole")
        candidates = [body_of(out.pid, version.number, v, total)[start:stop] for v in variants]
        got = out.body
        if any(c.startswith(got) for c in candidates):
            return
        # Not the version's bytes: a tampered copy on disk?
        for variant, expected in zip(variants, candidates, strict=True):
            prefix = expected[: len(got)]
            if len(prefix) != len(got):
                continue
            diffs = [i for i in range(len(got)) if got[i] != prefix[i]]
            flips = {
                t.offset - start
                for t in self.tampered
                if (t.pid, t.version, t.variant) == (out.pid, version.number, variant)
            }
            if diffs and set(diffs) <= flips:
                if spec.digest and out.completed:
                    fail(
                        "tampered-digest-served",
                        f"{etag} (Repr-Digest known) ended cleanly with tampered bytes "
                        f"at {diffs[:4]}",
                    )
                return
        if spec.kind == "links":
            strangers = [v for v in (*HOSTS.values(), NO_HOST) if v not in variants]
            for variant in strangers:
                if body_of(out.pid, version.number, variant, total)[start:stop].startswith(got):
                    fail("poisoning", f"a page built for another client's host ({variant!r})")
                    return
        where = next(
            (i for i in range(len(got)) if all(i >= len(c) or got[i] != c[i] for c in candidates)),
            0,
        )
        record = (
            got[where - where % RECORD : where - where % RECORD + RECORD]
            if where >= where % RECORD
            else b""
        )
        fail(
            "wrong-bytes",
            f"body differs from {etag} at byte {start + where}: got {got[where : where + 16]!r}"
            f" (record {parse_record(record) if len(record) == RECORD else record!r})",
        )


# ---- the app at rest ------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def disk_use(root: Path) -> tuple[int, list[Path], list[Path]]:
    """(bytes of every file under root, the files, empty directories two or more levels
    below root)."""
    total = 0
    files: list[Path] = []
    empty: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        for name in filenames:
            path = here / name
            try:
                total += path.lstat().st_size
            except FileNotFoundError:
                continue
            files.append(path)
        depth = len(here.relative_to(root).parts)
        if not dirnames and not filenames and depth >= 3:
            empty.append(here)
    return total, files, empty


def data_files(root: Path) -> list[tuple[Path, tuple[int, int, str, int]]]:
    """Files under root that hold body records (whatever the layout), with their first
    record's (pid, version, variant, index)."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with path.open("rb") as f:
                head = f.read(RECORD)
        except OSError:
            continue
        parsed = parse_record(head)
        if parsed is not None:
            out.append((path, parsed))
    return out


def meta_files(root: Path) -> list[Path]:
    """Files under root that are JSON metadata (whatever the layout)."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with path.open("rb") as f:
                head = f.read(1)
        except OSError:
            continue
        if head == b"{":
            out.append(path)
    return out
