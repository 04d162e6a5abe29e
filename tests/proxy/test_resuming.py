"""BodyResumer: continues a failed body only with the same representation's next bytes, and
closes every resume answer it does not hand back."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import ClassVar

import httpx
import pytest

from relay.config import Config, Route
from relay.errors import TransferAborted
from relay.net.client import UpstreamClient
from relay.net.upstream import Upstream
from relay.proxy.exchange import Exchange
from relay.proxy.resuming import BodyResumer

ROUTE = Route(prefix="/o/", upstream="http://upstream.test/")
FIRST_HEADERS = {
    "content-length": "100",
    "etag": '"v1"',
    "accept-ranges": "bytes",
}


class Closing(httpx.AsyncByteStream):
    """A body that counts its closes."""

    closed: ClassVar[list[int]] = []

    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body

    async def aclose(self) -> None:
        Closing.closed.append(1)


def _resumer(
    handler: httpx.MockTransport, attempts: int = 2
) -> tuple[BodyResumer, httpx.Response, Exchange]:
    config = dataclasses.replace(Config(routes=(ROUTE,)), resume_attempts=attempts)
    upstream = Upstream(UpstreamClient(transport=handler), config)
    request = upstream.build_request("GET", "http://upstream.test/f", [], ROUTE)
    first = httpx.Response(200, headers=FIRST_HEADERS, stream=Closing(b""), request=request)
    exchange = Exchange()
    return BodyResumer(first, upstream, ROUTE, attempts, exchange), first, exchange


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    Closing.closed = []

    async def no_sleep(delay: float) -> None:
        return None

    monkeypatch.setattr("relay.proxy.resuming.asyncio.sleep", no_sleep)


async def test_resuming_a_206_at_the_offset_with_the_same_etag_continues_the_body() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"content-range": "bytes 40-99/100", "etag": '"v1"', "content-length": "60"}
        return httpx.Response(206, headers=headers, stream=Closing(b"x" * 60))

    resumer, first, exchange = _resumer(httpx.MockTransport(handler))
    response = await resumer.resume(first, 40, httpx.ReadError("cut"))
    assert response.status_code == 206
    assert seen[0].headers["range"] == "bytes=40-99"
    assert seen[0].headers["if-range"] == '"v1"'
    assert exchange.resumes == 1
    assert Closing.closed == [1]  # the failed response, not the one handed back
    await response.aclose()


async def test_resuming_never_joins_another_version_and_closes_its_answer() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"content-range": "bytes 40-99/100", "etag": '"v2"', "content-length": "60"}
        return httpx.Response(206, headers=headers, stream=Closing(b"y" * 60))

    resumer, first, exchange = _resumer(httpx.MockTransport(handler))
    with pytest.raises(TransferAborted):
        await resumer.resume(first, 40, httpx.ReadError("cut"))
    assert exchange.resumes == 0
    assert Closing.closed == [1, 1]  # the failed response and the refused answer


async def test_resuming_retries_a_transient_status_then_gives_up_within_the_budget() -> None:
    calls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(503, stream=Closing(b""))

    resumer, first, _ = _resumer(httpx.MockTransport(handler), attempts=3)
    with pytest.raises(TransferAborted):
        await resumer.resume(first, 40, httpx.ReadError("cut"))
    # resume_attempts resume requests, each answered 503 and closed.
    assert len(calls) == 3
    assert Closing.closed == [1, 1, 1, 1]


async def test_resuming_with_no_attempts_aborts_without_asking_upstream() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no resume request expected")

    resumer, first, _ = _resumer(httpx.MockTransport(handler), attempts=0)
    with pytest.raises(TransferAborted, match="cut"):
        await resumer.resume(first, 40, httpx.ReadError("cut"))
