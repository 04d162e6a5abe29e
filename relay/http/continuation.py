"""When a body continues: the one rule set of streams, download jobs and `relay fetch`.

Sans-IO: given what the first response said (a `Continuation`), the bytes already had and the
next response's status and headers, `Continuation.judge` says whether that response continues
the body and what to do otherwise; `Retries` counts failed attempts against a budget and says
how long to wait before the next one. The callers do the I/O.

A body is continued only with the same representation (RFC 9110 13.1.5, 14.4):

- the first response must carry a strong validator (a strong ETag, or a Last-Modified at
  least a second older than its Date) and `Accept-Ranges: bytes`; otherwise nothing is ever
  resumed (a stream aborts, a job or `relay fetch` starts again from zero);
- the next request asks for `Range: bytes=N-` (or `N-end`) with `If-Range: <validator>`;
- only a 206 whose Content-Range starts exactly at N, ends where the first response would
  have, whose total equals the first response's length and which carries the same validator
  (the ETag; the Last-Modified date when that is what the body was resumed on) continues it.
  An upstream that ignores If-Range answers a changed object with a 206 of the new version:
  its bytes are never joined to the old ones;
- a 200 is the whole object again (it changed, or ranges are ignored): start from zero;
- a 416 whose length equals the bytes already had means the body is complete; any other 416
  is never appended.

Another mirror (`SWITCHED_FROM`): validators are not comparable across mirrors, so a body
continues from another mirror only when its identity is pinned by a SHA-256 the caller
verifies over the whole body before its last byte goes out (the mid-body switch): the 206 must
then start at N, end where the first response would have and give the same total, and any
digest it announces must be the pinned one; its validator is not compared.

Pinned by a digest on the same source (`Continuation.pinned`): a body named by its SHA-256 (a
registry blob, a manifest by digest, a Hub file by its sha256) is the same representation
wherever its bytes come from, as long as the caller verifies that digest over the whole body
before its last byte goes out (a mismatch aborts, never a spliced body). Registries, and object
storage behind their redirects, often send neither a strong validator nor `Accept-Ranges`: such
a body is continued all the same, by its known length, with `Range: bytes=N-` and no If-Range
(there is no validator to send), under the same 206 rules and the same digest rule as a switch.

Every failed attempt (a body cut, a resume request that fails to connect or times out, a
transient status in `RETRY_STATUSES`) counts against one budget, with `Backoff` between them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import httpx

from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.ranges import parse_content_range, parse_unsatisfied_range
from relay.http.validators import accepts_byte_ranges, is_strong_etag, resume_validator

#: Request extension: the request continues a body already partly had (Range from the byte
#: delivered). Its value is the SHA-256 (hex) pinning the body's identity, verified by the
#: caller before the body ends, or "" when none is known. Without a pin a continuation is
#: asked of the source that sent the first bytes only; with one, of another mirror too
#: (`relay.net.upstream.Upstream.open`).
CONTINUATION = "relay.continuation"

#: Response extension: the continuation was answered by another source than the one it was
#: asked of (the index of that mirror). Its validator says nothing about the first bytes:
#: judged with `pinned` (`Continuation.judge`).
SWITCHED_FROM = "relay.switched_from"

#: Transient statuses: the attempt failed, another may succeed (as curl --retry and pip do).
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


# ---- lengths ------------------------------------------------------------------------------------


def content_length(headers: httpx.Headers) -> int | None:
    """The body length a response declares; None when it declares none or an unusable one.

    Only ASCII digits count ("²".isdigit() is true, int("²") fails), and a Content-Length
    beside Transfer-Encoding does not describe the body (RFC 9112 6.3).
    """
    if "transfer-encoding" in headers:
        return None
    value = headers.get("content-length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else None


def validator_for(headers: httpx.Headers) -> str | None:
    """The If-Range value a body with these headers can be continued with, or None.

    A strong validator (see relay.http.validators.resume_validator) and `Accept-Ranges: bytes`.
    """
    return resume_validator(headers) if accepts_byte_ranges(headers) else None


def whole_range_total(headers: httpx.Headers) -> int | None:
    """The length when a 206 holds the whole representation (`bytes 0-(T-1)/T`), else None."""
    parsed = parse_content_range(headers.get("content-range"))
    if parsed is None or parsed.start != 0 or parsed.total is None:
        return None
    return parsed.total if parsed.end + 1 == parsed.total else None


# ---- waiting ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backoff:
    """Seconds before retry k (1-based): `first` x 2^(k-1), at most `cap`."""

    first: float
    cap: float

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """The wait after `failures` failed attempts; a server's Retry-After, up to the cap."""
        seconds = min(self.first * 2 ** max(failures - 1, 0), self.cap)
        if retry_after is not None:
            seconds = max(seconds, min(retry_after, self.cap))
        return float(seconds)


# The limits each caller needs: a stream holds a client waiting, a job has time.
STREAM_BACKOFF = Backoff(first=0.1, cap=2.0)
DOWNLOAD_BACKOFF = Backoff(first=0.2, cap=10.0)
FETCH_BACKOFF = Backoff(first=0.5, cap=10.0)  # relay fetch's --retry-delay replaces `first`


class Retries:
    """Failed attempts counted against a budget of `limit` retries.

    With `progress`, an attempt that got the body at least that many bytes further than any
    before it starts the count again: a long download on a flaky link is not failed for
    arriving in pieces, an upstream that dies after every few bytes is given up on.
    """

    def __init__(
        self, limit: int, backoff: Backoff, *, progress: int | None = None, position: int = 0
    ) -> None:
        self.limit = limit
        self.backoff = backoff
        self.failures = 0
        self._progress = progress
        self._furthest = position

    def fail(self, position: int = 0) -> bool:
        """Count a failed attempt that left the body at `position`; True if another may follow."""
        if self._progress is not None and position >= self._furthest + self._progress:
            self._furthest, self.failures = position, 0
        self.failures += 1
        return self.failures <= self.limit

    def delay(self, retry_after: float | None = None) -> float:
        """Seconds to wait before the next attempt."""
        return self.backoff.delay(self.failures, retry_after)


def retry_after(headers: httpx.Headers) -> float | None:
    """A Retry-After given in seconds (a date is ignored)."""
    value = headers.get("retry-after", "").strip()
    return float(value) if value.isascii() and value.isdigit() else None


# ---- judging the next response ------------------------------------------------------------------


class Next(enum.Enum):
    """What to do with the response to a continuation request."""

    APPEND = "append"
    """A 206 continuing the body exactly: append its bytes."""
    RESTART = "restart"
    """A 200: the whole object again (it changed, or ranges are ignored). Start from zero."""
    CHANGED = "changed"
    """A 206 of another version (other validator or length, or none): never appended; the
    bytes already had belong to a representation the upstream no longer serves."""
    BAD_RANGE = "bad_range"
    """A 206 that does not continue at the offset, or without a usable Content-Range."""
    COMPLETE = "complete"
    """A 416 whose length equals the bytes already had: nothing is left to fetch."""
    REFUSED = "refused"
    """Any other 416: the range was refused; its body is never appended."""
    RETRY = "retry"
    """A transient status (RETRY_STATUSES): a failed attempt, within the retry budget."""
    FAIL = "fail"
    """Any other status: final."""


@dataclass(frozen=True, slots=True)
class Verdict:
    next: Next
    reason: str = ""
    """Why the response does not continue the body (empty for APPEND)."""
    total: int | None = None
    """The representation's length as this response gives it, when it does."""

    @property
    def continues(self) -> bool:
        return self.next is Next.APPEND


@dataclass(frozen=True, slots=True)
class Continuation:
    """What a body's first response promised, against which every continuation is judged."""

    validator: str
    """The first response's strong validator, sent as If-Range ("" when the body is pinned
    by a digest and the response gave none)."""
    start: int = 0
    """Offset of the first body byte of the first response (a client's own Range)."""
    end: int | None = None
    """Offset of the last body byte expected (inclusive); None: to the end of the object."""
    total: int | None = None
    """The representation's complete length, if known."""
    pinned: str | None = None
    """The SHA-256 (hex) naming the body, which the caller verifies over the whole body
    before its last byte goes out (see the module)."""

    @classmethod
    def for_response(
        cls, response: httpx.Response, *, pinned: str | None = None
    ) -> Continuation | None:
        """The continuation of a first response's body; None when it cannot be continued.
        `pinned`: the digest the caller verifies the body against (see the module)."""
        if response.request.method != "GET":
            return None
        validator = validator_for(response.headers)
        if validator is None and pinned:
            validator = ""  # continued by its digest and known length alone
        if validator is None:
            return None
        if response.status_code == 200:
            total = content_length(response.headers)
            if not validator and not total:
                return None  # pinned, but not where it ends
            end = total - 1 if total else None
            return cls(validator=validator, start=0, end=end, total=total, pinned=pinned)
        if response.status_code == 206:
            parsed = parse_content_range(response.headers.get("content-range"))
            if parsed is None or (not validator and parsed.total is None):
                return None  # multipart/byteranges or malformed: not resumable
            return cls(
                validator=validator,
                start=parsed.start,
                end=parsed.end,
                total=parsed.total,
                pinned=pinned,
            )
        return None

    def range_header(self, have: int) -> str:
        end = "" if self.end is None else str(self.end)
        return f"bytes={self.start + have}-{end}"

    def request_headers(self, have: int) -> list[tuple[str, str]]:
        """What to ask for next, after `have` body bytes: Range and If-Range (none without a
        validator: a body pinned by its digest)."""
        if not self.validator:
            return [("range", self.range_header(have))]
        return [("range", self.range_header(have)), ("if-range", self.validator)]

    def judge(
        self, status: int, headers: httpx.Headers, have: int, *, pinned: str | None = None
    ) -> Verdict:
        """Whether a response to `request_headers(have)` continues the body, else what it is.
        `pinned`: the response comes from another mirror and the body's identity is this
        SHA-256, which the caller verifies before the body ends (see the module)."""
        offset = self.start + have
        if status == 206:
            return self._judge_206(headers, offset, pinned)
        if status == 200:
            return Verdict(
                Next.RESTART, "resume answered 200, not 206", total=content_length(headers)
            )
        if status == 416:
            return self._judge_416(headers, offset)
        kind = Next.RETRY if status in RETRY_STATUSES else Next.FAIL
        return Verdict(kind, f"resume answered {status}, not 206")

    def judge_answer(self, response: httpx.Response, have: int) -> Verdict:
        """`judge` for the response to a continuation request: one from another mirror
        (`SWITCHED_FROM`) is judged on the digest its request was marked with
        (`CONTINUATION`), never on its validator."""
        pinned = None
        if SWITCHED_FROM in response.extensions:
            pinned = response.request.extensions.get(CONTINUATION) or ""
        return self.judge(response.status_code, response.headers, have, pinned=pinned)

    def mismatch(self, response: httpx.Response, have: int) -> str | None:
        """Why `response` cannot continue the body after `have` bytes, or None if it can."""
        verdict = self.judge(response.status_code, response.headers, have)
        return None if verdict.continues else verdict.reason

    def _judge_206(self, headers: httpx.Headers, offset: int, pinned: str | None) -> Verdict:
        parsed = parse_content_range(headers.get("content-range"))
        if parsed is None:
            return Verdict(Next.BAD_RANGE, "resume answered without a single Content-Range")
        if parsed.start != offset:
            return Verdict(Next.BAD_RANGE, f"resume started at byte {parsed.start}, not {offset}")
        if parsed.total is None:
            return Verdict(Next.BAD_RANGE, "resume answered without the total length")
        if self.total is not None and parsed.total != self.total:
            return Verdict(Next.CHANGED, f"resume total is {parsed.total}, not {self.total}")
        end = self.end if self.end is not None else parsed.total - 1
        if parsed.end != end:
            return Verdict(Next.BAD_RANGE, f"resume ends at byte {parsed.end}, not {end}")
        if pinned is not None:
            if not pinned:
                return Verdict(Next.CHANGED, "another mirror, and no digest pins the body")
            changed = self._pin_change(headers, pinned)
            if changed is not None:
                return Verdict(Next.CHANGED, f"another mirror: {changed}")
            return Verdict(Next.APPEND, total=parsed.total)
        changed = self._validator_change(headers)
        if changed is not None:
            return Verdict(Next.CHANGED, changed)
        return Verdict(Next.APPEND, total=parsed.total)

    def _validator_change(self, headers: httpx.Headers) -> str | None:
        """Why the 206 is not known to be the same version, or None when it is."""
        if not self.validator:
            return self._pin_change(headers, self.pinned or "")
        if is_strong_etag(self.validator):
            name, value = "ETag", headers.get("etag", "").strip()
        else:
            name, value = "Last-Modified", headers.get("last-modified", "").strip()
        if not value:
            return f"resume answered without the {name} it was asked for"
        if value != self.validator:
            return "validator changed"
        return None

    def _pin_change(self, headers: httpx.Headers, pinned: str) -> str | None:
        """A body pinned by its digest (and no comparable validator): a 206 announcing another
        digest is another body; one announcing none or this one continues it (the caller
        verifies the whole)."""
        if self.total is None:
            return "the length of a pinned body is not known"
        try:
            announced = upstream_sha256(headers)
        except DigestConflict:
            return "resume announces conflicting digests"
        if announced is not None and announced != pinned:
            return "resume announces another digest"
        return None

    def _judge_416(self, headers: httpx.Headers, offset: int) -> Verdict:
        total = parse_unsatisfied_range(headers.get("content-range"))
        if self.total is not None and total is not None and total != self.total:
            return Verdict(
                Next.CHANGED, f"the length changed from {self.total} to {total} bytes", total=total
            )
        if total is not None and total == offset and self.end is None:
            return Verdict(Next.COMPLETE, total=total)
        return Verdict(Next.REFUSED, f"resume refused (416, length {total})", total=total)


__all__ = [
    "CONTINUATION",
    "DOWNLOAD_BACKOFF",
    "FETCH_BACKOFF",
    "RETRY_STATUSES",
    "STREAM_BACKOFF",
    "SWITCHED_FROM",
    "Backoff",
    "Continuation",
    "Next",
    "Retries",
    "Verdict",
    "content_length",
    "retry_after",
    "validator_for",
    "whole_range_total",
]
