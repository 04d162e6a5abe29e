"""The cache reads time only from its injected clock: freshness moves when the clock does."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx

from relay import Config, Route, create_app
from relay.cache.clock import ManualClock
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)
BODY = b"stored bytes"


class _Body(httpx.AsyncByteStream):
    """A streamed body (relay reads raw bytes: a Response's ready `content` cannot be)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield BODY


def _origin(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"etag": '"v1"', "cache-control": "max-age=60"}
        if request.headers.get("if-none-match") == '"v1"':
            return httpx.Response(304, headers=headers)
        headers["content-length"] = str(len(BODY))
        return httpx.Response(200, headers=headers, stream=_Body())

    return httpx.MockTransport(handler)


async def test_an_injected_clock_moves_freshness(tmp_path: Path) -> None:
    """Stored fresh; the clock moved past max-age: the next request revalidates (no sleep)."""
    seen: list[httpx.Request] = []
    clock = ManualClock()
    config = Config(routes=ROUTES, cache_dir=str(tmp_path), cache_max_bytes=1 << 20)
    app = create_app(config, transport=_origin(seen), clock=clock)

    async def get() -> Client:
        client = Client()
        await app(http_scope(state, "/o/f"), client.receive, client.send)
        assert client.status == 200
        assert client.body == BODY
        return client

    async with lifespan_state(app) as state:
        assert (await get()).headers[b"cache-status"] == b"relay; fwd=miss"
        clock.advance(59)
        hit = await get()
        assert hit.headers[b"cache-status"] == b"relay; hit; ttl=1"
        assert hit.headers[b"age"] == b"59"
        assert len(seen) == 1
        clock.advance(2)
        revalidated = await get()
        assert revalidated.headers[b"cache-status"] == b"relay; fwd=stale; fwd-status=304"
        assert len(seen) == 2
        assert seen[1].headers["if-none-match"] == '"v1"'
        # The 304 was received at the clock's new time: fresh again from there.
        assert (await get()).headers[b"cache-status"] == b"relay; hit; ttl=60"
        assert len(seen) == 2
