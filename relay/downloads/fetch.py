"""Fetching a job's body into its partial file, resuming after upstream failures.

One attempt is one upstream GET. When the upstream dies, stalls or answers a transient status,
the next attempt asks for the rest: `Range: bytes=N-` with `If-Range` set to the object's
strong validator, and only if the upstream said `Accept-Ranges: bytes`. What the answer means
is decided by `relay.http.continuation` (the rule set shared with streams and `relay fetch`):

- a 206 continuing at N with the same validator and total: appended;
- 200: the object changed (or the upstream ignores ranges): start again from byte 0;
- a 206 of another version (an upstream ignoring If-Range), at the wrong offset or without a
  usable Content-Range, or a 416: the bytes on disk cannot be trusted to continue; start again
  from zero once, and fail if it happens again. A 416's body is never appended; a 416 saying
  the object is exactly N bytes long means the partial is complete.

Attempts that fail without real progress count against `resume_attempts`; one that took the
partial file at least `MIN_PROGRESS` bytes further than any attempt before it resets the
count, so a long download on a flaky link is not failed for arriving in several pieces, while
an upstream that dies after every few bytes is given up on. Between attempts: 0.2 s x 2^k,
capped (`DOWNLOAD_BACKOFF`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from relay.config import Route
from relay.downloads.errors import JobFailed, UpstreamFailure
from relay.downloads.model import Job
from relay.downloads.writer import PartialFile
from relay.errors import UpstreamError
from relay.http.continuation import (
    DOWNLOAD_BACKOFF,
    RETRY_STATUSES,
    Continuation,
    Next,
    Retries,
    content_length,
    whole_range_total,
)
from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.validators import accepts_byte_ranges, resume_validator
from relay.net.routing import Target
from relay.net.upstream import USER_AGENT, VIA, Upstream

logger = logging.getLogger(__name__)

MIN_PROGRESS = 1024 * 1024


def backoff_delay(failures: int) -> float:
    return DOWNLOAD_BACKOFF.delay(failures)


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
        retries = Retries(
            self._resume_attempts,
            DOWNLOAD_BACKOFF,
            progress=MIN_PROGRESS,
            position=self._partial.size,
        )
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
                if not retries.fail(self._partial.size):
                    raise JobFailed(
                        f"{exc.reason} (gave up after {retries.failures} attempts without progress)"
                    ) from None
                delay = backoff_delay(retries.failures)
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
        plan: Continuation | None = None
        if offset and (job.validator is None or not job.byte_ranges):
            logger.info("%s: no strong validator or no byte ranges: restarting", self._where)
            await self._restart()
            offset = 0
        if offset:
            assert job.validator is not None
            plan = Continuation(validator=job.validator, total=job.total)
        headers = plan.request_headers(offset) if plan is not None else []
        request = self._upstream.build_request(
            "GET", self._target.url, request_headers(route, headers), route
        )
        job.attempts += 1
        try:
            response = await self._upstream.open(request, route)
        except UpstreamError as exc:
            raise UpstreamFailure(exc.reason) from exc
        try:
            if await self._accept(response, plan, offset):
                await self._checkpoint()
                await self._receive(response)
        finally:
            # Shielded: the upstream connection is released even if this task is cancelled.
            await asyncio.shield(response.aclose())

    async def _restart(self) -> None:
        await self._partial.restart()
        self._job.bytes_done = 0

    async def _accept(
        self, response: httpx.Response, plan: Continuation | None, offset: int
    ) -> bool:
        """Judge the response head; True when its body is to be appended."""
        job, status = self._job, response.status_code
        if plan is not None:
            verdict = plan.judge(status, response.headers, offset)
            if verdict.next is Next.APPEND:
                # The same representation: what this response says about it still holds.
                job.total = verdict.total
                job.upstream_sha256 = (
                    self._announced_digest(response.headers) or job.upstream_sha256
                )
                return self._check_expected_size()
            if verdict.next is Next.COMPLETE:
                job.total = verdict.total
                return False  # everything was already on disk
            if verdict.next in (Next.CHANGED, Next.BAD_RANGE, Next.REFUSED):
                value = response.headers.get("content-range")
                raise BadResume(
                    f"upstream cannot continue at byte {offset}: {verdict.reason} "
                    f"(Content-Range {value!r}, length {job.total})"
                )
            if verdict.next is Next.RESTART:
                logger.info("%s: whole object sent instead of a range: restarting", self._where)
                await self._restart()
        if status == 200:
            job.total = content_length(response.headers)
            job.validator = resume_validator(response.headers)
            job.byte_ranges = accepts_byte_ranges(response.headers)
            job.upstream_sha256 = self._announced_digest(response.headers)
        elif status == 206 and plan is None:
            # A 206 to a request without Range: usable only if it holds the whole object.
            total = whole_range_total(response.headers)
            if total is None:
                value = response.headers.get("content-range")
                raise BadResume(f"upstream sent Content-Range {value!r} to a request for it all")
            job.total = total
            job.validator = resume_validator(response.headers)
            job.byte_ranges = True
            job.upstream_sha256 = self._announced_digest(response.headers)
        elif status in RETRY_STATUSES:
            raise UpstreamFailure(f"upstream answered {status}")
        else:
            raise JobFailed(f"upstream answered {status}")
        return self._check_expected_size()

    def _check_expected_size(self) -> bool:
        job = self._job
        if job.expected_size is not None and job.total not in (None, job.expected_size):
            raise JobFailed(
                f"size mismatch: the upstream has {job.total} bytes, {job.expected_size} expected"
            )
        return True

    def _announced_digest(self, headers: httpx.Headers) -> str | None:
        try:
            return upstream_sha256(headers)
        except DigestConflict as exc:
            raise JobFailed(str(exc)) from None

    async def _receive(self, response: httpx.Response) -> None:
        job, partial = self._job, self._partial
        declared = content_length(response.headers)
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
