"""Continuing a relayed body whose upstream response failed mid-body.

relay/http/continuation.py decides what continues a body; this module does the I/O for a
stream: it asks the upstream for the bytes after those already sent, waits between attempts,
and hands back a response that continues the body exactly, or raises `TransferAborted` (the
client transfer is then aborted, never ended cleanly short, never spliced with another
version's bytes).

`BodyResumer` is made when a body first fails, so most bodies never make one, and the
streaming loop keeps reading chunks straight from the current upstream response: resuming
costs nothing per chunk.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from relay.config import Route
from relay.errors import TransferAborted, UpstreamError
from relay.http.continuation import STREAM_BACKOFF, Continuation, Next, Retries, retry_after
from relay.http.resume import mark_continuation, resume_request_headers
from relay.net.upstream import Upstream
from relay.proxy.exchange import Exchange

logger = logging.getLogger(__name__)


class BodyResumer:
    """Replaces failed upstream responses of one body (judged against the first response)
    by ones that continue it, within `attempts` failed attempts.

    Owns every response it opens until it hands one back: a resume answer that does not
    continue the body is closed here. The caller owns (and closes) the response it is given.
    """

    __slots__ = ("_attempts", "_exchange", "_pinned", "_plan", "_retries", "_route", "_upstream")

    def __init__(
        self,
        first: httpx.Response,
        upstream: Upstream,
        route: Route,
        attempts: int,
        exchange: Exchange,
        pinned: str | None = None,
    ) -> None:
        """`pinned`: the SHA-256 the caller checks before the body ends: the body may then be
        continued without a validator (`relay.http.continuation`), and from another of the
        route's mirrors."""
        self._upstream = upstream
        self._pinned = pinned
        self._route = route
        self._attempts = attempts
        self._exchange = exchange
        self._plan = Continuation.for_response(first, pinned=pinned) if attempts else None
        self._retries = Retries(attempts, STREAM_BACKOFF)

    async def resume(
        self, failed: httpx.Response, sent: int, error: httpx.HTTPError
    ) -> httpx.Response:
        """A response continuing the body exactly after `sent` bytes, in place of `failed`
        (which `error` ended); TransferAborted when there is none to be had."""
        plan = self._plan
        if plan is None or not self._retries.fail():
            logger.warning(
                "upstream body failed after %d bytes, aborting the client transfer: %s (%s)",
                sent,
                error,
                failed.request.url.path,
            )
            raise TransferAborted(str(error)) from error
        return await self._resume(plan, failed, sent, str(error))

    async def _resume(
        self, plan: Continuation, failed: httpx.Response, sent: int, cause: str
    ) -> httpx.Response:
        """A resume request that cannot connect, times out or meets a transient status is one
        more failed attempt, retried while the budget allows; any answer that is not the same
        representation's next bytes aborts the client transfer."""
        retries = self._retries
        path = failed.request.url.path
        await failed.aclose()
        wait_at_least: float | None = None  # a transient status's Retry-After
        while True:
            logger.info(
                "upstream body failed after %d bytes (%s); resuming with %s, attempt %d of %d (%s)",
                sent,
                cause,
                plan.range_header(sent),
                retries.failures,
                self._attempts,
                path,
            )
            await asyncio.sleep(retries.delay(wait_at_least))
            request = self._upstream.build_request(
                "GET",
                failed.request.url,
                resume_request_headers(plan, failed.request, sent),
                self._route,
            )
            mark_continuation(request, self._pinned, failed.request)
            try:
                response = await self._upstream.open(request, self._route)
            except UpstreamError as exc:
                cause = f"resume failed: {exc.reason}"
                wait_at_least = None
            else:
                try:
                    verdict = plan.judge_answer(response, sent)
                except BaseException:
                    await asyncio.shield(response.aclose())
                    raise
                if verdict.continues:
                    self._exchange.resumes += 1
                    return response
                # Shielded: closing must finish even while this task is being cancelled.
                await asyncio.shield(response.aclose())
                cause = verdict.reason
                if verdict.next is not Next.RETRY:
                    logger.warning(
                        "cannot resume, aborting the client transfer: %s (%s)", cause, path
                    )
                    raise TransferAborted(cause)
                wait_at_least = retry_after(response.headers)
            if not retries.fail():
                logger.warning(
                    "cannot resume after %d attempts, aborting the client transfer: %s (%s)",
                    retries.failures,
                    cause,
                    path,
                )
                raise TransferAborted(cause)
