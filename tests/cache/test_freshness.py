"""Freshness through the app (RFC 9111 4.2, 5.2; RFC 5861): an object stored from a
`MockTransport` origin, the injected clock moved, then asked again: answered from the store,
revalidated, served stale or not. No sleeps: the clock is a `ManualClock`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from relay import Config, Route, create_app
from relay.cache.clock import ManualClock
from tests.asgi import Client, http_scope, lifespan_state
from tests.cache.model_origin import http_date
from tests.cache.test_model import known

BODY = b"fresh bytes " * 100
ETAG = '"f1"'


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data


@dataclass
class Case:
    headers: dict[str, str]
    """The origin's headers besides ETag and Date (`{date-N}`: N seconds before Date)."""
    advance: float
    """Seconds the clock moves between the first request (stored) and the second."""
    expect: str
    """The second answer: "hit" (origin not asked), "revalidated" (a 304 asked for, the
    stored bytes served), "stale" (stored bytes served although stale, the origin failing or
    asked in the background), "error" (the origin's 503 passed on)."""
    failing: bool = False
    """The origin answers 503 from the second request on."""
    age: int | None = None
    stale_if_error: float = 0.0
    """The route's cache_stale_if_error."""


CASES = {
    "max-age fresh": Case({"cache-control": "max-age=60"}, 59, "hit", age=59),
    "max-age stale at its lifetime": Case({"cache-control": "max-age=60"}, 60, "revalidated"),
    "s-maxage before max-age": Case({"cache-control": "max-age=5, s-maxage=30"}, 29, "hit"),
    "s-maxage ends": Case({"cache-control": "max-age=600, s-maxage=30"}, 30, "revalidated"),
    "expires minus date": Case({"expires": "{date+60}"}, 59, "hit"),
    "expires passed": Case({"expires": "{date+60}"}, 61, "revalidated"),
    "heuristic: a tenth of the last-modified age": Case(
        {"last-modified": "{date-1000}"}, 99, "hit"
    ),
    "heuristic ends": Case({"last-modified": "{date-1000}"}, 100, "revalidated"),
    "no lifetime": Case({}, 0, "revalidated"),
    "no-cache revalidates every time": Case(
        {"cache-control": "no-cache, max-age=60"}, 0, "revalidated"
    ),
    "the upstream's Age counts": Case(
        {"cache-control": "max-age=60", "age": "50"}, 9, "hit", age=59
    ),
    "the upstream's Age ends freshness": Case(
        {"cache-control": "max-age=60", "age": "50"}, 10, "revalidated"
    ),
    "stale-while-revalidate": Case(
        {"cache-control": "max-age=5, stale-while-revalidate=30"}, 20, "stale", age=20
    ),
    "past stale-while-revalidate": Case(
        {"cache-control": "max-age=5, stale-while-revalidate=30"}, 36, "revalidated"
    ),
    "stale-if-error": Case(
        {"cache-control": "max-age=5, stale-if-error=60"}, 20, "stale", failing=True, age=20
    ),
    "past stale-if-error": Case(
        {"cache-control": "max-age=5, stale-if-error=60"}, 66, "error", failing=True
    ),
    "no stale-if-error: the error": Case({"cache-control": "max-age=5"}, 20, "error", failing=True),
    "the route's stale-if-error": Case(
        {"cache-control": "max-age=5"}, 20, "stale", failing=True, stale_if_error=60
    ),
    "must-revalidate: never stale": Case(
        {"cache-control": "max-age=5, must-revalidate, stale-if-error=60"},
        20,
        "error",
        failing=True,
        stale_if_error=60,
    ),
    "s-maxage: never stale on error (RFC 9111 5.2.2.10)": Case(
        {"cache-control": "s-maxage=5, stale-if-error=60"}, 20, "error", failing=True
    ),
    "s-maxage: never stale while revalidating": Case(
        {"cache-control": "s-maxage=5, stale-while-revalidate=60"}, 20, "revalidated"
    ),
}
_S_MAXAGE_STALE = {
    "s-maxage: never stale on error (RFC 9111 5.2.2.10)",
    "s-maxage: never stale while revalidating",
}


def _params() -> list[object]:
    out: list[object] = []
    for name, case in CASES.items():
        marks = []
        if name in _S_MAXAGE_STALE and known("new-s-maxage-stale"):
            marks.append(pytest.mark.xfail(strict=True, reason="KNOWN_BUGS new-s-maxage-stale"))
        out.append(pytest.param(case, id=name, marks=marks))
    return out


@pytest.mark.parametrize("case", _params())
async def test_freshness(case: Case, tmp_path: Path) -> None:
    clock = ManualClock()
    asked: list[httpx.Request] = []
    failing = False

    def headers() -> dict[str, str]:
        now = clock.now()
        out = {"etag": ETAG, "date": http_date(now)}
        for name, value in case.headers.items():
            if value.startswith("{date"):
                value = http_date(now + float(value[5:-1]))
            out[name] = value
        return out

    def origin(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        if failing:
            return httpx.Response(503, headers={"content-length": "4"}, stream=_Body(b"busy"))
        if request.headers.get("if-none-match") == ETAG:
            return httpx.Response(304, headers=headers())
        return httpx.Response(
            200, headers={**headers(), "content-length": str(len(BODY))}, stream=_Body(BODY)
        )

    route = Route(
        prefix="/o/", upstream="http://origin.test/", cache_stale_if_error=case.stale_if_error
    )
    config = Config(routes=(route,), cache_dir=str(tmp_path), cache_max_bytes=1 << 20)
    app = create_app(config, transport=httpx.MockTransport(origin), clock=clock)
    async with lifespan_state(app) as state:

        async def get() -> Client:
            client = Client()
            await app(http_scope(state, "/o/f"), client.receive, client.send)
            return client

        first = await get()
        assert first.status == 200
        assert first.body == BODY
        clock.advance(case.advance)
        failing = case.failing
        before = len(asked)
        second = await get()
        cache = state["cache"]
        for task in list(cache.tasks):
            await task  # a background revalidation
        conditional = [r for r in asked[before:] if r.headers.get("if-none-match") == ETAG]
        if case.expect == "hit":
            assert len(asked) == before
        elif case.expect == "revalidated":
            assert conditional
            assert second.headers[b"cache-status"].startswith(b"relay; fwd=stale")
        elif case.expect == "stale":
            assert b"fwd=stale" in second.headers[b"cache-status"]
            assert b"detail=" in second.headers[b"cache-status"]
        if case.expect == "error":
            assert second.status == 503
        else:
            assert second.status == 200
            assert second.body == BODY
            assert second.headers[b"etag"] == ETAG.encode()
        if case.age is not None:
            assert second.headers[b"age"] == str(case.age).encode()
