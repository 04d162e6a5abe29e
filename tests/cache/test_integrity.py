"""The rules of verification (relay.cache.integrity), on relay's app over an
`httpx.MockTransport` origin with the injected clock: an object with a known digest loaded at
startup is unverified; a whole GET hashes it as it sends and holds its last chunk; anything
else waits for its check; a mismatch is dropped, counted and a miss."""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import Config, Route, create_app
from relay.cache.cache import Cache
from relay.cache.clock import ManualClock
from relay.errors import TransferAborted
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)
BODY = bytes(range(256)) * 512  # 128 KiB: more than one chunk
DIGEST = "sha-256=:" + base64.b64encode(hashlib.sha256(BODY).digest()).decode() + ":"


class _Body(httpx.AsyncByteStream):
    def __init__(self, body: bytes) -> None:
        self._body = body

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._body


def _origin(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        headers = {"etag": '"v1"', "cache-control": "max-age=60", "repr-digest": DIGEST}
        if request.headers.get("if-none-match") == '"v1"':
            return httpx.Response(304, headers=headers)
        asked = request.headers.get("range", "").removeprefix("bytes=")
        if asked:
            first, _, last = asked.partition("-")
            start, stop = int(first), min(int(last) + 1, len(BODY))
            headers["content-range"] = f"bytes {start}-{stop - 1}/{len(BODY)}"
            headers["content-length"] = str(stop - start)
            return httpx.Response(206, headers=headers, stream=_Body(BODY[start:stop]))
        headers["content-length"] = str(len(BODY))
        return httpx.Response(200, headers=headers, stream=_Body(BODY))

    return httpx.MockTransport(handler)


class Relay:
    """relay's app on one cache_dir, started again as a restart would."""

    def __init__(self, tmp_path: Path) -> None:
        self.seen: list[httpx.Request] = []
        self.clock = ManualClock()
        self.config = Config(
            routes=ROUTES,
            cache_dir=str(tmp_path),
            cache_max_bytes=1 << 24,
            cache_verify_on_start=False,
        )

    def app(self) -> Any:
        return create_app(self.config, transport=_origin(self.seen), clock=self.clock)


async def _get(app: Any, state: dict[str, Any], **headers: str) -> Client:
    client = Client()
    method = headers.pop("method", "GET")
    raw = [(b"host", b"relay.test"), *((k.encode(), v.encode()) for k, v in headers.items())]
    await app(http_scope(state, "/o/f", method=method, headers=raw), client.receive, client.send)
    return client


def _flip(root: Path) -> None:
    (data,) = [p for p in (root / "objects").rglob("*.data") if p.is_file()]
    body = bytearray(data.read_bytes())
    body[len(body) - 3] ^= 1
    data.write_bytes(bytes(body))


async def _stored(relay: Relay, tmp_path: Path, *, flip: bool) -> None:
    app = relay.app()
    async with lifespan_state(app) as state:
        first = await _get(app, state)
        assert first.body == BODY
        assert first.headers[b"cache-status"] == b"relay; fwd=miss"
    if flip:
        _flip(tmp_path)


class Restarted:
    """relay started again on a cache_dir holding the object (its app, state and cache)."""

    def __init__(self, relay: Relay, app: Any, state: dict[str, Any]) -> None:
        self.relay = relay
        self.app = app
        self.state = state
        cache = state["cache"]
        assert isinstance(cache, Cache)
        self.cache = cache

    async def get(self, **headers: str) -> Client:
        return await _get(self.app, self.state, **headers)


@contextlib.asynccontextmanager
async def _restarted(tmp_path: Path, *, flip: bool, advance: float = 0) -> AsyncIterator[Restarted]:
    """The object stored (one byte flipped on disk if `flip`), the clock advanced, relay
    started again: its one entry is unverified."""
    relay = Relay(tmp_path)
    await _stored(relay, tmp_path, flip=flip)
    relay.clock.advance(advance)
    app = relay.app()
    async with lifespan_state(app) as state:
        started = Restarted(relay, app, state)
        (entry,) = started.cache.index.entries()
        assert not entry.verified
        yield started


async def test_a_whole_get_holds_its_last_chunk_until_the_digest_matches(tmp_path: Path) -> None:
    """Flipped 3 bytes before the end: every chunk but the last is sent, then the transfer is
    aborted (never completed), the object dropped and counted; the next GET is a miss."""
    async with _restarted(tmp_path, flip=True) as restarted:
        cache = restarted.cache
        (entry,) = cache.index.entries()
        client = Client()
        with pytest.raises(TransferAborted):
            await restarted.app(http_scope(restarted.state, "/o/f"), client.receive, client.send)
        assert client.status == 200
        assert not client.completed
        assert len(client.body) < len(BODY)
        assert client.body == BODY[: len(client.body)]
        assert cache.stats.digest_mismatches == 1
        assert entry.corrupt
        assert cache.index.entries() == []
        again = await restarted.get()
        assert again.headers[b"cache-status"] == b"relay; fwd=miss"
        assert again.body == BODY
        assert len(restarted.relay.seen) == 2


async def test_an_intact_whole_get_verifies_the_object(tmp_path: Path) -> None:
    async with _restarted(tmp_path, flip=False) as restarted:
        cache = restarted.cache
        (entry,) = cache.index.entries()
        hit = await restarted.get()
        assert hit.completed
        assert hit.body == BODY
        assert hit.headers[b"cache-status"].startswith(b"relay; hit")
        assert entry.verified
        assert cache.stats.digest_mismatches == 0
        assert len(restarted.relay.seen) == 1


@pytest.mark.parametrize(
    "headers",
    [{"range": "bytes=5-9"}, {"if-none-match": '"v1"'}, {"method": "HEAD"}],
    ids=["range", "304", "head"],
)
async def test_other_answers_wait_for_the_check_and_are_misses(
    tmp_path: Path, headers: dict[str, str]
) -> None:
    """A range, a conditional and a HEAD of the flipped object: checked first, dropped,
    counted, and answered as if it had never been stored (from the upstream)."""
    async with _restarted(tmp_path, flip=True) as restarted:
        answered = await restarted.get(**dict(headers))
        assert b"hit" not in answered.headers.get(b"cache-status", b"")
        assert restarted.cache.stats.digest_mismatches == 1
        assert len(restarted.relay.seen) == 2  # asked of the upstream (a range: its slice)
        if "range" in headers:
            assert answered.status == 206
            assert answered.body == BODY[5:10]


async def test_a_stale_unverified_object_is_checked_then_revalidated(tmp_path: Path) -> None:
    """Past max-age, a range of an intact object: its check passes, then the revalidation's
    304 refreshes it; the object stays verified and is answered from the cache."""
    async with _restarted(tmp_path, flip=False, advance=61) as restarted:
        ranged = await restarted.get(range="bytes=0-3")
        assert ranged.status == 206
        assert ranged.body == BODY[:4]
        assert ranged.headers[b"cache-status"] == b"relay; fwd=stale; fwd-status=304"
        assert restarted.relay.seen[-1].headers["if-none-match"] == '"v1"'
        (entry,) = restarted.cache.index.entries()
        assert entry.verified
        assert restarted.cache.stats.digest_mismatches == 0
