"""The rest of a body too large to store, handed from its fill to a reader.

A chunked body that outgrows what may be stored is not stored, and never cut: its fill offers
its live upstream response (a `Rest`, continuing right after the bytes the partial file holds)
to its readers, and gives up owning it to the first that takes it (`HandOver.take`); the others
continue with Range + If-Range on the body's strong validator (`HandOver.continue_at`, judged by
`relay.http.continuation`). A rest nobody takes is closed by the hand-over, once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import httpx

from relay.config import Route
from relay.errors import UpstreamError
from relay.http.continuation import Continuation
from relay.http.resume import mark_continuation, resume_request_headers
from relay.net.upstream import Upstream


class Rest:
    """The rest of a body from the upstream: its response and the iterator of its raw bytes
    (a response's bytes are iterated once: whoever continues takes both). `aclose` releases
    both."""

    __slots__ = ("chunks", "response")

    def __init__(self, response: httpx.Response, chunks: AsyncIterator[bytes] | None = None):
        self.response = response
        self.chunks = chunks if chunks is not None else response.aiter_raw()

    async def aclose(self) -> None:
        try:
            aclose = getattr(self.chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        finally:
            await self.response.aclose()


class Overflow(Exception):
    """An unsized body outgrew what may be stored: `rest` carries what follows."""

    def __init__(self, rest: Rest) -> None:
        super().__init__("too large to store")
        self.rest = rest


class HandOver:
    """The rest of one overflowed body, offered to its fill's readers (`offer`), and the way
    a reader that did not take it continues on its own (`continue_at`)."""

    __slots__ = ("_changed", "_offered", "_plan", "_request", "_route", "_upstream")

    def __init__(
        self,
        rest: Rest,
        first: httpx.Response,
        *,
        upstream: Upstream,
        request: httpx.Request,
        route: Route,
    ) -> None:
        """`rest`: the live response, now the hand-over's own; `first`: the response the
        body began with (its validator and length judge the continuations); `request`: the
        fill's."""
        self._offered: Rest | None = rest
        self._plan = Continuation.for_response(first)
        self._upstream = upstream
        self._request = request
        self._route = route
        self._changed = asyncio.Event()

    @property
    def offered(self) -> bool:
        """The live response is still offered (it holds an upstream connection)."""
        return self._offered is not None

    def take(self) -> Rest | None:
        """The live response, continuing right after the bytes the fill wrote, to the first
        reader that asks (it then owns and closes it); None once taken or closed."""
        rest, self._offered = self._offered, None
        if rest is not None:
            self._changed.set()
        return rest

    def reader_left(self) -> None:
        """A reader left: the offer ends if it was the last."""
        self._changed.set()

    async def offer(self, readers: Callable[[], int]) -> None:
        """Return once the live response is taken or no reader is left (`readers()`); one
        not taken is closed here, with its byte iterator."""
        try:
            while self._offered is not None and readers():
                await self._changed.wait()
                self._changed.clear()
        finally:
            rest, self._offered = self._offered, None
            if rest is not None:
                await asyncio.shield(rest.aclose())

    async def continue_at(self, position: int) -> Rest | None:
        """An upstream response continuing the body at `position` (Range + If-Range on its
        strong validator, judged by `relay.http.continuation`), owned by the caller; None when
        the body cannot be continued."""
        plan = self._plan
        if plan is None:
            return None
        request = self._upstream.build_request(
            "GET",
            self._request.url,
            resume_request_headers(plan, self._request, position),
            self._route,
        )
        mark_continuation(request, None, self._request)  # never another mirror's bytes
        try:
            response = await self._upstream.open(request, self._route)
        except UpstreamError:
            return None
        if plan.judge(response.status_code, response.headers, position).continues:
            return Rest(response)
        await response.aclose()
        return None
