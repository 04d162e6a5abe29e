"""A malformed record found at startup (the app's lifespan, `httpx.MockTransport`): relay starts,
says so in one warning line, discards that object (asked again, it is a miss, never a 500),
and every other object is still a hit."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from relay import Config, Route, create_app
from relay.cache.clock import ManualClock
from relay.cache.key import base_key, digest
from tests.asgi import Client, http_scope, lifespan_state
from tests.cache.records import DAMAGES

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)


class _Body(httpx.AsyncByteStream):
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body


def _body(path: str) -> bytes:
    return f"the bytes of {path}\n".encode() * 100


def _origin(seen: list[str]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        body = _body(request.url.path)
        headers = {"etag": '"e"', "cache-control": "max-age=600", "content-length": str(len(body))}
        return httpx.Response(200, headers=headers, stream=_Body(body))

    return httpx.MockTransport(handler)


async def _get(app: object, state: dict[str, object], path: str) -> Client:
    client = Client()
    await app(http_scope(state, path), client.receive, client.send)  # type: ignore[operator]
    assert client.status == 200
    assert client.body == _body(path.removeprefix("/o"))
    return client


def _record(tmp_path: Path, path: str) -> Path:
    name = digest(base_key("/o/", path.encode(), b""))
    (record,) = (tmp_path / "objects" / name[:2]).glob(f"{name}.*.meta")
    return record


@pytest.mark.parametrize("damage", sorted(DAMAGES))
async def test_a_malformed_record_is_dropped_at_startup_and_nothing_else(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[str] = []
    config = Config(routes=ROUTES, cache_dir=str(tmp_path), cache_max_bytes=1 << 24)
    paths = ["/o/good", "/o/bad", "/o/other"]
    first = create_app(config, transport=_origin(seen), clock=ManualClock())
    async with lifespan_state(first) as state:
        for path in paths:
            await _get(first, state, path)
        for task in list(state["cache"].tasks):
            await task
    record = _record(tmp_path, "/o/bad")
    record.write_bytes(DAMAGES[damage](record.read_bytes()))
    seen.clear()
    caplog.clear()
    second = create_app(config, transport=_origin(seen), clock=ManualClock())
    with caplog.at_level(logging.WARNING):
        async with lifespan_state(second) as state:
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert len(warnings) == 1, warnings
            assert record.name in warnings[0]
            for path in ("/o/good", "/o/other"):
                hit = await _get(second, state, path)
                assert hit.headers[b"cache-status"].startswith(b"relay; hit")
            miss = await _get(second, state, "/o/bad")
            assert miss.headers[b"cache-status"] == b"relay; fwd=miss"
            assert seen == ["/bad"]
            for task in list(state["cache"].tasks):
                await task
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_huge_upstream_ages_and_lifetimes_are_capped_and_survive_a_restart(
    tmp_path: Path,
) -> None:
    """An upstream's `max-age` of 400 digits (and such an `Age`) counts as 2^31 seconds
    (RFC 9111 1.2.2): the hit's ttl is a number, never a 500, and the record loads again."""
    huge = "9" * 400
    body = b"forever"

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"cache-control": f"max-age={huge}", "content-length": str(len(body))}
        if request.url.path == "/aged":
            headers["age"] = huge
        return httpx.Response(200, headers=headers, stream=_Body(body))

    config = Config(routes=ROUTES, cache_dir=str(tmp_path), cache_max_bytes=1 << 24)
    for _ in range(2):
        app = create_app(config, transport=httpx.MockTransport(handler), clock=ManualClock())
        async with lifespan_state(app) as state:
            for path in ("/o/f", "/o/aged"):
                client = Client()
                await app(http_scope(state, path), client.receive, client.send)
                assert client.status == 200
                assert client.body == body
                for task in list(state["cache"].tasks):
                    await task
            hit = Client()
            await app(http_scope(state, "/o/f"), hit.receive, hit.send)
            assert hit.headers[b"cache-status"] == b"relay; hit; ttl=2147483648"
            assert state["cache"].index.peek(base_key("/o/", b"/o/f", b"")) is not None
