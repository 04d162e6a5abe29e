"""A Debian `by-hash/SHA256/<hex>` file is named by its digest: the cache stores it (as
immutable) only once its bytes match that name, whichever mirror sent them, on relay's app
over an `httpx.MockTransport` origin."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import Config, Route, create_app
from relay.cache.cache import Cache
from relay.cache.clock import ManualClock
from relay.config import Mirror
from relay.errors import TransferAborted
from tests.asgi import Client, http_scope, lifespan_state

BODY = bytes(range(256)) * 512
NAME = hashlib.sha256(BODY).hexdigest()


class _Body(httpx.AsyncByteStream):
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body[:65536]
        yield self._body[65536:]


PATH = f"/debian/dists/stable/main/binary-amd64/by-hash/SHA256/{NAME}"


@asynccontextmanager
async def _relay(
    tmp_path: Path, mirrors: list[str], handler: Callable[[httpx.Request], httpx.Response]
) -> AsyncIterator[tuple[Any, dict[str, Any]]]:
    """relay's app with a debian route over `mirrors` (its app and lifespan state)."""
    route = Route(
        prefix="/debian/", upstreams=tuple(Mirror(url=u) for u in mirrors), preset="debian"
    )
    config = Config(routes=(route,), cache_dir=str(tmp_path), cache_max_bytes=1 << 24)
    app = create_app(config, transport=httpx.MockTransport(handler), clock=ManualClock())
    async with lifespan_state(app) as state:
        yield app, state


@pytest.mark.parametrize("upstreams", [1, 2])
async def test_a_by_hash_file_with_other_bytes_is_aborted_and_never_stored(
    tmp_path: Path, upstreams: int
) -> None:
    """The only mirror, or the second one after the first answered 404, serves other bytes of
    the right length under the name: the client's transfer is aborted, nothing is stored
    (the next request asks again)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if upstreams == 2 and request.url.host == "first.test":
            return httpx.Response(404)
        wrong = BODY[:-1] + b"\x00"
        return httpx.Response(200, headers={"content-length": str(len(wrong))}, stream=_Body(wrong))

    mirrors = ["http://first.test/debian/", "http://second.test/debian/"][-upstreams:]
    async with _relay(tmp_path, mirrors, handler) as (app, state):
        cache: Cache = state["cache"]
        for _ in range(2):
            client = Client()
            with pytest.raises(TransferAborted):
                await app(http_scope(state, PATH), client.receive, client.send)
            assert not client.completed
            assert client.body == BODY[: len(client.body)]
        assert cache.index.entries() == []
    assert len([r for r in seen if r.url.host == "second.test" or upstreams == 1]) == 2


async def test_a_by_hash_file_with_its_own_bytes_is_stored_verified(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"content-length": str(len(BODY))}, stream=_Body(BODY))

    async with _relay(tmp_path, ["http://first.test/debian/"], handler) as (app, state):
        cache: Cache = state["cache"]
        for _ in range(2):
            client = Client()
            await app(http_scope(state, PATH), client.receive, client.send)
            assert client.completed
            assert client.body == BODY
        (entry,) = cache.index.entries()
        assert entry.meta.sha256 == NAME
    assert len(seen) == 1
