"""One transfer: a URL's body into a sink, attempt after attempt, until the sink holds all of it.

An attempt is one GET, opened by the caller's `Opener` (which decides where requests may go,
with which headers and credentials: the engine never does). When an attempt fails (refused,
reset, dropped, timed out, a transient status in `RETRY_STATUSES`), the next one asks for the
rest: `Range: bytes=N-` with `If-Range` set to the representation's strong validator, and only
when the first answer offered one with `Accept-Ranges: bytes`; without, the sink starts again
from byte 0. What the answer to a resume means is decided by `relay.http.continuation`, the one
rule set of streams, download jobs and `relay fetch`:

- a 206 continuing at N with the same validator and total: appended;
- a 200: the object changed (or ranges are ignored): the sink starts again from byte 0;
- a 206 of another version, a 416 refusing the range, or (with `Policy.restart_bad_range`) a
  206 at the wrong offset or without a usable Content-Range: the bytes already had cannot be
  continued; the sink starts again from zero once, and the transfer fails if it happens
  again. A 416's body is never appended; a 416 saying the object is exactly N bytes long means
  the sink is complete.

Failed attempts count against `Policy.retries`; with `Policy.progress`, an attempt that took
the sink that many bytes further than any before resets the count (a long transfer on a flaky
link is not failed for arriving in pieces). Between attempts `Policy.backoff` waits, longer
when the upstream's Retry-After asks for it (up to the backoff's cap).

A body running past its length (or past the expected size) is cut at once; one ending short of
it without a transport error is a size mismatch. The digest is checked when the sink is
published (`PartialFile.publish`, or `verify` for a sink that is not a file).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import httpx

from relay.http.continuation import (
    RETRY_STATUSES,
    Backoff,
    Continuation,
    Next,
    Retries,
    content_length,
    retry_after,
    validator_for,
    whole_range_total,
)
from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.validators import resume_validator
from relay.transfer.errors import (
    AttemptFailed,
    StatusLine,
    TransferError,
    UnexpectedStatus,
    UnusableResume,
    VerificationFailed,
)
from relay.transfer.partial import Sink

Opener = Callable[[list[tuple[str, str]]], Awaitable[httpx.Response]]
"""Sends the GET with these extra headers (Range, If-Range) and returns the response once its
head arrived. Raises AttemptFailed for a failure worth another attempt; anything else it
raises ends the transfer and passes through unchanged."""


@dataclass(frozen=True, slots=True)
class Representation:
    """What the upstream said about the object whose bytes the sink holds."""

    validator: str | None = None
    """The strong validator to resume with (If-Range), offered with `Accept-Ranges: bytes`;
    None: the transfer cannot be resumed, only started again."""
    total: int | None = None
    """The object's complete length, from Content-Length (200) or Content-Range (206)."""
    sha256: str | None = None
    """The SHA-256 the upstream announced for the whole object (`relay.http.digests`)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """How hard a transfer tries."""

    retries: int
    """Failed attempts allowed after the first (see `progress`)."""
    backoff: Backoff
    progress: int | None = None
    """Bytes of progress after which the count of failed attempts starts again."""
    restart_bad_range: bool = True
    """Start again from zero when a resume is answered by a 206 at the wrong offset (as for
    another version); False: that ends the transfer, the bytes had are kept."""


class Events:
    """What a transfer tells its program. Override what you need; the defaults do nothing."""

    async def head(self, representation: Representation, response: httpx.Response) -> None:
        """A response was accepted and its body is about to be appended: record what resuming
        needs. An exception raised here ends the transfer."""

    def progress(self, size: int, received: int) -> None:
        """`received` bytes were appended; the sink holds `size`."""

    async def restarting(self, reason: str) -> None:
        """The sink is about to be emptied; the next byte is byte 0 (forget what described
        the bytes it held)."""

    def retrying(self, error: AttemptFailed, delay: float, failures: int) -> None:
        """An attempt failed; the next starts in `delay` seconds (`failures` counted so far)."""


class _StartOver(Exception):
    """The answer to a resume cannot continue the sink's bytes."""

    def __init__(self, reason: str, *, bad_range: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.bad_range = bad_range


class Transfer:
    def __init__(
        self,
        open: Opener,
        sink: Sink,
        *,
        policy: Policy,
        known: Representation | None = None,
        expected_size: int | None = None,
        events: Events | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._open = open
        self._sink = sink
        self._policy = policy
        self._rep = known if known is not None else Representation()
        self._expected_size = expected_size
        self._events = events if events is not None else Events()
        self._sleep = sleep

    @property
    def representation(self) -> Representation:
        return self._rep

    async def run(self) -> None:
        """Return once the sink holds the whole body; raise TransferError otherwise."""
        policy, sink = self._policy, self._sink
        retries = Retries(
            policy.retries, policy.backoff, progress=policy.progress, position=sink.size
        )
        restarted = False
        while True:
            try:
                await self._attempt()
                return
            except _StartOver as exc:
                if restarted or (exc.bad_range and not policy.restart_bad_range):
                    raise UnusableResume(exc.reason) from None
                restarted = True
                await self._restart(exc.reason)
            except AttemptFailed as exc:
                if not retries.fail(sink.size):
                    exc.failures = retries.failures
                    raise
                if sink.size and self._rep.validator is None:
                    try:
                        await self._restart("no strong validator and byte ranges to resume with")
                    except TransferError as cannot:  # a sink that cannot start over
                        raise TransferError(f"{exc.reason}; {cannot.reason}") from exc
                delay = retries.delay(exc.retry_after)
                self._events.retrying(exc, delay, retries.failures)
                await self._sleep(delay)

    async def _attempt(self) -> None:
        offset = self._sink.size
        if offset and self._rep.validator is None:
            await self._restart("no strong validator and byte ranges to resume with")
            offset = 0
        plan: Continuation | None = None
        if offset:
            assert self._rep.validator is not None
            plan = Continuation(validator=self._rep.validator, total=self._rep.total)
        response = await self._open(plan.request_headers(offset) if plan is not None else [])
        try:
            if await self._accept(response, plan, offset):
                await self._events.head(self._rep, response)
                await self._receive(response)
        finally:
            # Shielded: the upstream connection is released even if this task is cancelled.
            await asyncio.shield(response.aclose())

    async def _restart(self, reason: str) -> None:
        await self._events.restarting(reason)
        await self._sink.restart()

    async def _accept(
        self, response: httpx.Response, plan: Continuation | None, offset: int
    ) -> bool:
        """Judge the response head; True when its body is to be appended."""
        status, headers = response.status_code, response.headers
        if plan is not None:
            verdict = plan.judge_answer(response, offset)
            if verdict.next is Next.APPEND:
                # The same representation: what this response says about it still holds.
                announced = self._announced(headers) or self._rep.sha256
                self._rep = replace(self._rep, total=verdict.total, sha256=announced)
                self._check_expected_size()
                return True
            if verdict.next is Next.COMPLETE:
                self._rep = replace(self._rep, total=verdict.total)
                return False  # the sink already holds every byte
            if verdict.next in _UNUSABLE:
                raise _StartOver(
                    f"{_UNUSABLE[verdict.next]} at byte {offset}: {verdict.reason} "
                    f"(Content-Range {headers.get('content-range')!r}, length {self._rep.total})",
                    bad_range=verdict.next is Next.BAD_RANGE,
                )
            if verdict.next is Next.RESTART:
                await self._restart(
                    "the upstream sent the whole file (it changed, or ignores ranges)"
                )
        if status == 200:
            self._rep = Representation(
                validator=validator_for(headers),
                total=content_length(headers),
                sha256=self._announced(headers),
            )
        elif status == 206 and plan is None:
            # A 206 to a request without Range: usable only if it holds the whole object.
            total = whole_range_total(headers)
            if total is None:
                raise _StartOver(
                    "unusable 206 to a request for it all "
                    f"(Content-Range {headers.get('content-range')!r})",
                    bad_range=True,
                )
            self._rep = Representation(
                validator=resume_validator(headers), total=total, sha256=self._announced(headers)
            )
        elif status in RETRY_STATUSES:
            raise AttemptFailed(
                f"upstream answered {status}",
                answer=_status_line(response),
                retry_after=retry_after(headers),
            )
        else:
            raise UnexpectedStatus(_status_line(response))
        self._check_expected_size()
        return True

    def _check_expected_size(self) -> None:
        expected, total = self._expected_size, self._rep.total
        if expected is not None and total not in (None, expected):
            raise VerificationFailed(
                f"size mismatch: the upstream has {total} bytes, {expected} expected"
            )

    def _announced(self, headers: httpx.Headers) -> str | None:
        try:
            return upstream_sha256(headers)
        except DigestConflict as exc:
            raise VerificationFailed(str(exc)) from None

    async def _receive(self, response: httpx.Response) -> None:
        sink, events = self._sink, self._events
        total = self._rep.total
        limit = total if total is not None else self._expected_size
        try:
            async for chunk in response.aiter_raw():
                if limit is not None and sink.size + len(chunk) > limit:
                    raise VerificationFailed(
                        f"size mismatch: the upstream sent more than {limit} bytes"
                    )
                await sink.write(chunk)
                events.progress(sink.size, len(chunk))
        except httpx.HTTPError as exc:
            raise AttemptFailed(describe(exc)) from exc
        if total is not None and sink.size != total:
            # Only a transport that does not check framing ends a body short without an error.
            raise VerificationFailed(f"size mismatch: received {sink.size} bytes, expected {total}")


_UNUSABLE = {
    Next.CHANGED: "the file changed",
    Next.REFUSED: "the upstream refused the range",
    Next.BAD_RANGE: "unusable 206",
}

_KINDS: dict[type[httpx.HTTPError], str] = {
    httpx.ConnectTimeout: "timed out connecting",
    httpx.ReadTimeout: "timed out reading",
    httpx.ConnectError: "cannot connect",
    httpx.RemoteProtocolError: "connection lost",
    httpx.ReadError: "connection lost",
}


def describe(exc: httpx.HTTPError) -> str:
    """One line saying what failed: "connection lost: <the library's first line>"."""
    kind = _KINDS.get(type(exc), type(exc).__name__)
    detail = (str(exc).strip().splitlines() or [""])[0][:200]
    return f"{kind}: {detail}" if detail and detail != "timed out" else kind


def _status_line(response: httpx.Response) -> StatusLine:
    return StatusLine(response.status_code, response.reason_phrase, str(response.url))


__all__ = ["Events", "Opener", "Policy", "Representation", "Transfer", "describe"]
