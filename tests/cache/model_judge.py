"""The cache model's checks (tests/cache/test_model.py): what one client saw, judged against
the origin's history.

The reference model is deliberately small: the origin's history. For each representation
(ETag) it records when the origin confirmed it (a 200/206 carrying it, or a 304 naming it) and
with which headers. An answer relay gives without asking the origin is legitimate only if one
such confirmation still allows it under RFC 9111 / RFC 5861 (fresh, or within
stale-while-revalidate, or within stale-if-error while the origin fails) and no later 304 that
relay itself asked for made the representation private/no-store. Everything else is a
property of the single answer (bytes, headers, statuses).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from relay.cache.policy import directives
from tests.cache.model_origin import (
    HOSTS,
    NO_HOST,
    RECORD,
    Exchange,
    Origin,
    Version,
    body_of,
    etag_list,
    parse_date,
    parse_etag,
    parse_record,
)


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
    loaded: bool = False
    """relay restarted since: it loaded the tampered file from disk. Only then must it never
    serve the bytes cleanly (an object with a known digest is verified after a restart;
    while relay runs, changed bytes under a verified object are a scrub's to find: hits are
    sent zero-copy, not hashed)."""


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
            loaded = any(
                t.loaded
                for t in self.tampered
                if (t.pid, t.version, t.variant) == (out.pid, version.number, variant)
                and t.offset - start in diffs
            )
            if diffs and set(diffs) <= flips:
                if spec.digest and out.completed and loaded:
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
