"""Fetching a job's body into its partial file, resuming after upstream failures.

One attempt is one upstream GET. When the upstream dies, stalls or answers 5xx, the next
attempt asks for the rest: `Range: bytes=N-` with `If-Range` set to the object's strong
validator, and only if the upstream said `Accept-Ranges: bytes`. Then:

- 206 with `Content-Range: bytes N-(T-1)/T` (T the length seen before): appended;
- 200: the object changed (or the upstream ignores ranges): start again from byte 0;
- any other 206 (wrong start, end or length) or a 416: the bytes on disk cannot be trusted to
  continue; start again from zero once, and fail if it happens again. A 416's body is never
  appended; a 416 saying the object is exactly N bytes long means the partial is complete.

Attempts that fail without real progress count against `resume_attempts`; one that took the
partial file at least `MIN_PROGRESS` bytes further than any attempt before it resets the
count, so a long download on a flaky link is not failed for arriving in several pieces, while
an upstream that dies after every few bytes is given up on. Between attempts: 0.2 s x 2^k,
capped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from relay.config import Route
from relay.downloads.digests import DigestConflict, upstream_sha256
from relay.downloads.errors import JobFailed, UpstreamFailure
from relay.downloads.model import Job
from relay.downloads.writer import PartialFile
from relay.errors import UpstreamError
from relay.headers import USER_AGENT, VIA
from relay.ranges import parse_content_range, parse_unsatisfied_range
from relay.routing import Target
from relay.upstream import Upstream
from relay.validators import accepts_byte_ranges, resume_validator

logger = logging.getLogger(__name__)

BACKOFF_BASE = 0.2
BACKOFF_CAP = 10.0
MIN_PROGRESS = 1024 * 1024
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def backoff_delay(failures: int) -> float:
    return float(min(BACKOFF_BASE * 2 ** max(failures - 1, 0), BACKOFF_CAP))


class BadResume(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Fetcher:
    def __init__(
        self,
        upstream: Upstream,
        job: Job,
        target: Target,
        partial: PartialFile,
        *,
        resume_attempts: int,
        checkpoint: Callable[[], Awaitable[None]],
    ) -> None:
        self._upstream = upstream
        self._job = job
        self._target = target
        self._partial = partial
        self._resume_attempts = resume_attempts
        self._checkpoint = checkpoint
        self._where = target.url.split("?", 1)[0]  # for logs: a query may carry signatures

    async def run(self) -> None:
        """Return once the partial file holds the whole body; raise JobFailed otherwise."""
        failures = 0
        furthest = self._partial.size
        restarted_after_bad_resume = False
        while True:
            try:
                await self._attempt()
                return
            except BadResume as exc:
                if restarted_after_bad_resume:
                    raise JobFailed(exc.reason) from None
                restarted_after_bad_resume = True
                logger.warning("%s: %s; starting again from zero", self._where, exc.reason)
                await self._restart()
            except UpstreamFailure as exc:
                if self._partial.size >= furthest + MIN_PROGRESS:
                    furthest, failures = self._partial.size, 0
                failures += 1
                if failures > self._resume_attempts:
                    raise JobFailed(
                        f"{exc.reason} (gave up after {failures} attempts without progress)"
                    ) from None
                delay = backoff_delay(failures)
                logger.warning(
                    "%s: %s; resuming from byte %d in %.1fs",
                    self._where,
                    exc.reason,
                    self._partial.size,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _attempt(self) -> None:
        job, partial = self._job, self._partial
        offset = partial.size
        route = self._target.route
        headers: list[tuple[str, str]] = []
        if offset and (job.validator is None or not job.byte_ranges):
            logger.info("%s: no strong validator or no byte ranges: restarting", self._where)
            await self._restart()
            offset = 0
        if offset:
            assert job.validator is not None
            headers += [("range", f"bytes={offset}-"), ("if-range", job.validator)]
        request = self._upstream.build_request(
            "GET", self._target.url, request_headers(route, headers), route
        )
        job.attempts += 1
        try:
            response = await self._upstream.open(request, route)
        except UpstreamError as exc:
            raise UpstreamFailure(exc.reason) from exc
        try:
            if await self._accept(response, offset):
                await self._checkpoint()
                await self._receive(response)
        finally:
            # Shielded: the upstream connection is released even if this task is cancelled.
            await asyncio.shield(response.aclose())

    async def _restart(self) -> None:
        await self._partial.restart()
        self._job.bytes_done = 0

    async def _accept(self, response: httpx.Response, offset: int) -> bool:
        """Judge the response head; True when its body is to be appended."""
        job, status = self._job, response.status_code
        if status == 200:
            if offset:
                logger.info("%s: whole object sent instead of a range: restarting", self._where)
                await self._restart()
            job.total = _content_length(response.headers)
            job.validator = resume_validator(response.headers)
            job.byte_ranges = accepts_byte_ranges(response.headers)
            job.upstream_sha256 = self._announced_digest(response.headers)
        elif status == 206:
            self._check_content_range(response.headers.get("content-range"), offset)
            # Same object (If-Range held): what this response says about it still holds.
            job.validator = resume_validator(response.headers) or job.validator
            job.byte_ranges = True
            job.upstream_sha256 = self._announced_digest(response.headers) or job.upstream_sha256
        elif status == 416 and offset:
            total = parse_unsatisfied_range(response.headers.get("content-range"))
            if job.total is not None and total is not None and total != job.total:
                raise BadResume(f"the upstream's length changed from {job.total} to {total} bytes")
            if total == offset:
                job.total = total
                return False  # everything was already on disk
            raise BadResume(f"upstream refused bytes={offset}- (416, length {total})")
        elif status in RETRY_STATUSES:
            raise UpstreamFailure(f"upstream answered {status}")
        else:
            raise JobFailed(f"upstream answered {status}")
        if job.expected_size is not None and job.total not in (None, job.expected_size):
            raise JobFailed(
                f"size mismatch: the upstream has {job.total} bytes, {job.expected_size} expected"
            )
        return True

    def _check_content_range(self, value: str | None, offset: int) -> None:
        job = self._job
        content_range = parse_content_range(value)
        if (
            content_range is None
            or content_range.start != offset
            or content_range.total is None
            or content_range.end + 1 != content_range.total
            or job.total not in (None, content_range.total)
        ):
            raise BadResume(
                f"upstream sent Content-Range {value!r} for bytes={offset}- of {job.total}"
            )
        job.total = content_range.total

    def _announced_digest(self, headers: httpx.Headers) -> str | None:
        try:
            return upstream_sha256(headers)
        except DigestConflict as exc:
            raise JobFailed(str(exc)) from None

    async def _receive(self, response: httpx.Response) -> None:
        job, partial = self._job, self._partial
        declared = _content_length(response.headers)
        limit = job.total if job.total is not None else job.expected_size
        received = 0
        try:
            async for chunk in response.aiter_raw():
                if limit is not None and partial.size + len(chunk) > limit:
                    raise JobFailed(f"size mismatch: the upstream sent more than {limit} bytes")
                await partial.write(chunk)
                received += len(chunk)
                job.bytes_done = partial.size
                job.rate.add(len(chunk))
        except httpx.HTTPError as exc:
            cause = (str(exc) or type(exc).__name__).splitlines()[0][:200]
            raise UpstreamFailure(f"upstream body failed at byte {partial.size}: {cause}") from exc
        if declared is not None and received != declared:
            raise UpstreamFailure(f"upstream body ended after {received} of {declared} bytes")
        if job.total is not None and partial.size != job.total:
            raise UpstreamFailure(f"upstream body ended at byte {partial.size} of {job.total}")


def request_headers(route: Route, extra: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """What a download sends upstream: no client headers, only relay's own and the route's."""
    headers = [
        ("accept-encoding", "identity"),  # the stored file is the representation as sent
        ("user-agent", USER_AGENT),
        ("via", VIA.decode("ascii")),
        *extra,
    ]
    if route.credential:
        headers.append((route.auth_header, route.credential))
    return headers


def _content_length(headers: httpx.Headers) -> int | None:
    value = headers.get("content-length", "").strip()
    return int(value) if value.isascii() and value.isdigit() else None
