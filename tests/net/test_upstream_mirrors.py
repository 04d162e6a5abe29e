"""`Upstream.open` over a route's mirrors, on `httpx.MockTransport`: which URL each attempt
goes to, with which credential, and what a continuation may do."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest

from relay.config import Config, Mirror, Route
from relay.errors import UpstreamUnavailable
from relay.http.continuation import SWITCHED_FROM
from relay.http.resume import mark_continuation
from relay.net.upstream import MIRROR_INDEX, Upstream

A, B, C = "http://a.test/x/", "http://b.test/", "http://c.test/y/"
SHA = "ab" * 32

Handler = Callable[[httpx.Request], Awaitable[httpx.Response]]


def mirrored(**keys: object) -> Route:
    mirrors = (Mirror(url=A), Mirror(url=B, credential="Bearer b"), Mirror(url=C))
    return Route(prefix="/m/", upstreams=mirrors, credential="Bearer a", **keys)  # type: ignore[arg-type]


async def opened(
    route: Route, handler: Handler, headers: dict[str, str] | None = None, pinned: str | None = None
) -> tuple[httpx.Response | Exception, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    async def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return await handler(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(record)) as client:
        upstream = Upstream(client, Config(routes=(route,)))
        sent = [*(headers or {}).items(), ("authorization", "Bearer a")]
        request = upstream.build_request("GET", A + "f.bin", sent, route)
        if headers and "range" in headers:
            mark_continuation(request, pinned)
        try:
            response = await upstream.open(request, route)
        except UpstreamUnavailable as exc:
            return exc, seen
        await response.aclose()
    return response, seen


def answer(statuses: dict[str, int]) -> Handler:
    async def handle(request: httpx.Request) -> httpx.Response:
        for base, status in statuses.items():
            if str(request.url).startswith(base):
                return httpx.Response(status, content=b"x")
        raise httpx.ConnectError("refused", request=request)

    return handle


async def test_each_attempt_goes_below_its_mirror_with_its_own_credential() -> None:
    response, seen = await opened(mirrored(failover="any"), answer({A: 503, B: 404, C: 200}))
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200
    assert response.extensions[MIRROR_INDEX] == 2
    assert [str(r.url) for r in seen] == [A + "f.bin", B + "f.bin", C + "f.bin"]
    assert [r.headers.get("authorization") for r in seen] == ["Bearer a", "Bearer b", None]
    assert [r.headers["host"] for r in seen] == ["a.test", "b.test", "c.test"]


async def test_a_connect_error_is_the_answer_under_not_found() -> None:
    response, seen = await opened(mirrored(), answer({B: 200}))
    assert isinstance(response, UpstreamUnavailable)
    assert len(seen) == 1


async def test_an_unpinned_continuation_stays_on_its_mirror() -> None:
    headers = {"range": "bytes=10-", "if-range": '"v1"'}
    response, seen = await opened(mirrored(failover="any"), answer({A: 503, B: 206}), headers)
    assert isinstance(response, httpx.Response)
    assert response.status_code == 503
    assert [str(r.url) for r in seen] == [A + "f.bin"]


async def test_a_pinned_continuation_asks_the_next_mirror_first_without_if_range() -> None:
    headers = {"range": "bytes=10-", "if-range": '"v1"'}
    response, seen = await opened(
        mirrored(failover="any"), answer({A: 206, B: 206}), headers, pinned=SHA
    )
    assert isinstance(response, httpx.Response)
    assert response.extensions[SWITCHED_FROM] == 0
    assert [str(r.url) for r in seen] == [B + "f.bin"]
    assert "if-range" not in seen[0].headers
    assert seen[0].headers["range"] == "bytes=10-"
    # Under "not-found" a pinned continuation stays too (no name goes on for an error).
    response, seen = await opened(mirrored(), answer({A: 206, B: 206}), headers, pinned=SHA)
    assert [str(r.url) for r in seen] == [A + "f.bin"]
    assert isinstance(response, httpx.Response)
    assert SWITCHED_FROM not in response.extensions


async def test_a_hedge_takes_the_first_head_and_cancels_the_late_request() -> None:
    cancelled = asyncio.Event()

    async def handle(request: httpx.Request) -> httpx.Response:
        if request.url.host == "a.test":
            try:
                await asyncio.Event().wait()  # never a head
            except asyncio.CancelledError:
                cancelled.set()
                raise
        return httpx.Response(200, content=b"fast")

    response, seen = await opened(mirrored(failover="any", hedge_after=0.01), handle)
    assert isinstance(response, httpx.Response)
    assert response.extensions[MIRROR_INDEX] == 1
    assert [r.url.host for r in seen] == ["a.test", "b.test"]
    assert cancelled.is_set()  # the late request is not left running


@pytest.mark.parametrize("status", [401, 403, 407, 400])
async def test_refusals_are_answered_whatever_the_policy(status: int) -> None:
    response, seen = await opened(mirrored(failover="any"), answer({A: status, B: 200}))
    assert isinstance(response, httpx.Response)
    assert response.status_code == status
    assert len(seen) == 1
