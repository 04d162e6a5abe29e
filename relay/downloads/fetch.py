"""A job's side of its transfer (`relay.transfer`): what the engine needs, as the job has it.

The engine makes the attempts, resumes with Range + If-Range, checks sizes and digests. This
module gives it what belongs to the job:

- requests go through the shared `Upstream` (the route's egress policy, redirects and
  credential) and carry only relay's own headers and the route's credential, never a client's;
- what the upstream says about the object (validator, length, announced sha256) is put on the
  job and saved (`checkpoint`, which also checks the byte quota) before its body is appended,
  so a job resumed after a restart continues the same representation;
- progress, the rate and the attempt count are the job's; restarts and retries are logged;
- a route with several mirrors: the first request goes to them in turn (`Upstream.open`); a
  continuation goes to the mirror that sent the first bytes, or, when the file's sha256 is
  known (the job's expected one, or one the upstream announced, both checked before the file
  is published), to the next mirror too;
- the policy: `resume_attempts` failed attempts in a row, counted afresh after each
  `MIN_PROGRESS` bytes of progress; `DOWNLOAD_BACKOFF` between attempts; a 206 at the wrong
  offset restarts from zero once (nobody is there to retry a job by hand);
- a failure ends the job as JobFailed (`as_job_failure`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from relay.config import Route
from relay.downloads.errors import as_job_failure
from relay.downloads.model import Job
from relay.errors import UpstreamError
from relay.http.continuation import DOWNLOAD_BACKOFF
from relay.http.resume import mark_continuation
from relay.net.mirrors import pinned_sha256
from relay.net.routing import Target
from relay.net.upstream import USER_AGENT, VIA, Upstream
from relay.transfer import Events, PartialFile, Policy, Representation, Transfer
from relay.transfer.errors import AttemptFailed

logger = logging.getLogger(__name__)

MIN_PROGRESS = 1024 * 1024


class Fetcher(Events):
    def __init__(
        self,
        upstream: Upstream,
        job: Job,
        target: Target,
        partial: PartialFile,
        *,
        resume_attempts: int,
        checkpoint: Callable[[], Awaitable[None]],
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._upstream = upstream
        self._job = job
        self._target = target
        self._partial = partial
        self._checkpoint = checkpoint
        self._where = target.url.split("?", 1)[0]  # for logs: a query may carry signatures
        self._source: tuple[httpx.URL, int] | None = None
        """The mirror URL (and its index) whose answer the partial file's bytes came from;
        None: the target's own URL (a followed redirect's is never asked directly)."""
        known = Representation(
            validator=job.validator if job.byte_ranges else None,
            total=job.total,
            sha256=job.upstream_sha256,
        )
        self._transfer = Transfer(
            self._open,
            partial,
            policy=Policy(retries=resume_attempts, backoff=DOWNLOAD_BACKOFF, progress=MIN_PROGRESS),
            known=known,
            expected_size=job.expected_size,
            events=self,
            sleep=sleep,
        )

    async def run(self) -> None:
        """Return once the partial file holds the whole body; raise JobFailed otherwise."""
        with as_job_failure():
            await self._transfer.run()
        self._record(self._transfer.representation)

    async def _open(self, extra: list[tuple[str, str]]) -> httpx.Response:
        route = self._target.route
        continues = any(name == "range" for name, _ in extra)
        url: str | httpx.URL = self._target.url
        headers = request_headers(route, extra)
        if continues and self._source is not None:
            url, index = self._source
            headers = [(n, v) for n, v in headers if n != route.auth_header]
            if route.mirror_credential(index):
                headers.append((route.auth_header, route.mirror_credential(index)))
        request = self._upstream.build_request("GET", url, headers, route)
        if continues:
            known = self._job.expected_sha256 or self._job.upstream_sha256
            pinned = (
                pinned_sha256(route, request.url.path, httpx.Headers(), known) if known else None
            )
            mark_continuation(request, pinned)
        self._job.attempts += 1
        try:
            return await self._upstream.open(request, route)
        except UpstreamError as exc:
            raise AttemptFailed(exc.reason) from exc

    def _record(self, representation: Representation) -> None:
        job = self._job
        job.total = representation.total
        job.validator = representation.validator
        job.byte_ranges = representation.validator is not None
        job.upstream_sha256 = representation.sha256

    # ---- the transfer's events ------------------------------------------------------------

    async def head(self, representation: Representation, response: httpx.Response) -> None:
        url = response.request.url
        index = self._upstream.mirrors.of(self._target.route).index_of(str(url))
        self._source = (url, index) if index is not None else None
        self._record(representation)
        await self._checkpoint()

    def progress(self, size: int, received: int) -> None:
        self._job.bytes_done = size
        self._job.rate.add(received)

    async def restarting(self, reason: str) -> None:
        logger.warning("%s: %s; starting again from zero", self._where, reason)
        self._job.bytes_done = 0

    def retrying(self, error: AttemptFailed, delay: float, failures: int) -> None:
        logger.warning(
            "%s: %s; resuming from byte %d in %.1fs",
            self._where,
            error.reason,
            self._partial.size,
            delay,
        )


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
