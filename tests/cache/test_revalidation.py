"""What a revalidation's answer does to the stored response (RFC 9111 4.3.4), and how clients'
conditional requests are answered, through the app on an `httpx.MockTransport` upstream and a
`ManualClock` (no sleep): a 304 refreshes only the response whose validator it names; one
naming another version makes the object a miss; one adding `private` or `no-store` stops the
object being shared; clients waiting on a revalidation keep their bytes when the entry goes;
answers from slices and from unsized fills go through the same conditional rules as whole
objects."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from relay import Config, Route, create_app
from relay.cache.cache import Cache
from relay.cache.clock import ManualClock
from relay.cache.key import base_key
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)
V1 = b"version one bytes"
V2 = b"VERSION TWO BYTES"  # the same length: only the validator tells them apart


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data


def _ok(body: bytes, etag: str, cache_control: str = "max-age=60", status: int = 200) -> Reply:
    headers = {"etag": etag, "cache-control": cache_control, "content-length": str(len(body))}
    return lambda request: httpx.Response(status, headers=headers, stream=_Body(body))


def _not_modified(**headers: str) -> Reply:
    named = {k.replace("_", "-"): v for k, v in headers.items()}
    return lambda request: httpx.Response(304, headers=named)


Reply = Callable[[httpx.Request], httpx.Response]


class Upstream:
    """Answers each request with the next scripted reply (the last one repeats)."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.seen: list[httpx.Request] = []

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        reply = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return reply(request)

    def conditional(self, index: int) -> bool:
        headers = self.seen[index].headers
        return "if-none-match" in headers or "if-modified-since" in headers


class Relay:
    def __init__(self, tmp_path: Path, upstream: Upstream, **settings: object) -> None:
        self.clock = ManualClock()
        config = Config(
            routes=ROUTES,
            cache_dir=str(tmp_path),
            cache_max_bytes=1 << 20,
            **settings,  # type: ignore[arg-type]
        )
        self.app = create_app(
            config, transport=httpx.MockTransport(upstream.handler), clock=self.clock
        )
        self.state: dict[str, object] = {}

    async def get(self, path: str = "/o/f", **headers: str) -> Client:
        client = Client()
        raw = [(b"host", b"relay.test")] + [
            (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()
        ]
        await self.app(http_scope(self.state, path, headers=raw), client.receive, client.send)
        assert client.completed
        return client


def _status(client: Client) -> str:
    return client.headers.get(b"cache-status", b"").decode()


async def test_a_304_naming_another_etag_is_a_miss_never_the_old_bytes(tmp_path: Path) -> None:
    """Stored "e1", revalidated, the upstream says 304 with ETag "e2": the e1 bytes are not
    "e2"'s. The stored response is dropped and the object fetched once, unconditionally:
    the client gets the e2 bytes under "e2", and a Range with If-Range "e2" is cut from them."""
    upstream = Upstream(
        _ok(V1, '"e1"'), _not_modified(etag='"e2"', cache_control="max-age=60"), _ok(V2, '"e2"')
    )
    relay = Relay(tmp_path, upstream)
    async with lifespan_state(relay.app) as relay.state:
        assert (await relay.get()).body == V1
        relay.clock.advance(61)
        again = await relay.get()
        assert (again.status, again.body, again.headers[b"etag"]) == (200, V2, b'"e2"')
        assert _status(again) == "relay; fwd=stale"
        assert len(upstream.seen) == 3
        assert upstream.conditional(1)
        assert upstream.seen[1].headers["if-none-match"] == '"e1"'
        assert not upstream.conditional(2)
        ranged = await relay.get(range="bytes=0-6", if_range='"e2"')
        assert (ranged.status, ranged.body) == (206, V2[:7])
        assert _status(ranged).startswith("relay; hit")
        assert len(upstream.seen) == 3


async def test_a_304_naming_another_version_then_an_error_serves_no_stale_bytes(
    tmp_path: Path,
) -> None:
    """The stored response a 304 disowned is not served even where stale-if-error would
    allow a stale one: the upstream's failure is the client's answer."""
    upstream = Upstream(
        _ok(V1, '"e1"', "max-age=60, stale-if-error=600"),
        _not_modified(etag='"e2"'),
        _ok(b"unavailable", '"x"', status=503),
    )
    relay = Relay(tmp_path, upstream)
    async with lifespan_state(relay.app) as relay.state:
        await relay.get()
        relay.clock.advance(61)
        failed = await relay.get()
        assert failed.status == 503
        assert V1 not in failed.body


async def test_a_304_with_the_stored_validator_refreshes_it(tmp_path: Path) -> None:
    """Its ETag (or, without one, its Last-Modified; or no validator at all) is the stored
    response's: the stored bytes are answered, fresh again."""
    upstream = Upstream(
        _ok(V1, '"e1"'),
        _not_modified(etag='"e1"', cache_control="max-age=60"),
        _not_modified(cache_control="max-age=60"),
    )
    relay = Relay(tmp_path, upstream)
    async with lifespan_state(relay.app) as relay.state:
        await relay.get()
        for _ in range(2):
            relay.clock.advance(61)
            refreshed = await relay.get()
            assert (refreshed.body, refreshed.headers[b"etag"]) == (V1, b'"e1"')
            assert _status(refreshed) == "relay; fwd=stale; fwd-status=304"
            assert _status(await relay.get()).startswith("relay; hit")
        assert len(upstream.seen) == 3


@pytest.mark.parametrize("directive", ["private", "no-store"])
async def test_a_304_that_forbids_sharing_stops_the_stored_object_being_served(
    tmp_path: Path, directive: str
) -> None:
    """A 304 updating the stored response with `private` or `no-store`: a shared cache may
    not keep it (RFC 9111 3, 5.2.2.5, 5.2.2.7), nor answer anyone from it. It is dropped,
    the request that revalidated it is relayed (its own request upstream: the upstream's
    answer for that client), and the next ones too, instead of a hit for max-age."""
    upstream = Upstream(
        _ok(V1, '"e1"'),
        _not_modified(etag='"e1"', cache_control=f"{directive}, max-age=600"),
        _ok(V1, '"e1"', f"{directive}, max-age=600"),
    )
    relay = Relay(tmp_path, upstream)
    async with lifespan_state(relay.app) as relay.state:
        await relay.get()
        relay.clock.advance(61)
        relayed = await relay.get()
        assert (relayed.status, relayed.body) == (200, V1)
        assert b"cache-status" not in relayed.headers
        assert upstream.seen[1].headers["if-none-match"] == '"e1"'
        assert not upstream.conditional(2)
        later = await relay.get()
        assert b"cache-status" not in later.headers
        assert len(upstream.seen) == 4
        cache = relay.state["cache"]
        assert isinstance(cache, Cache)
        await cache.disk.drain()  # files are removed on the cache's threads
        assert list(tmp_path.rglob("*.data")) == []


async def test_a_304_for_a_stale_slice_naming_another_version_replaces_the_slices(
    tmp_path: Path,
) -> None:
    """The same rule for slices: a 304 to a slice's revalidation that names another ETag
    refreshes no slice; they are dropped and the range is answered from the new version."""
    size = 64 * 1024
    one = bytes(range(256)) * (2 * size // 256)
    two = bytes(reversed(one))

    def part(body: bytes, etag: str) -> Reply:
        def reply(request: httpx.Request) -> httpx.Response:
            first = int(request.headers["range"].split("=")[1].split("-")[0])
            chunk = body[first : first + size]
            headers = {
                "etag": etag,
                "cache-control": "max-age=60",
                "content-range": f"bytes {first}-{first + len(chunk) - 1}/{len(body)}",
                "content-length": str(len(chunk)),
            }
            return httpx.Response(206, headers=headers, stream=_Body(chunk))

        return reply

    upstream = Upstream(
        part(one, '"e1"'),
        part(one, '"e1"'),
        _not_modified(etag='"e2"', cache_control="max-age=60"),
        part(two, '"e2"'),
    )
    relay = Relay(tmp_path, upstream, cache_slice_bytes=size)
    async with lifespan_state(relay.app) as relay.state:
        first = await relay.get(range=f"bytes=0-{2 * size - 1}")
        assert (first.status, first.body) == (206, one)
        relay.clock.advance(61)
        again = await relay.get(range="bytes=0-99")
        assert (again.status, again.body, again.headers[b"etag"]) == (206, two[:100], b'"e2"')
        assert upstream.conditional(2)
        assert not upstream.conditional(3)
        # The other stored slice (e1) went with it: the rest comes from the new version.
        rest = await relay.get(range=f"bytes={size}-")
        assert (rest.body, rest.headers[b"etag"]) == (two[size:], b'"e2"')
        assert len(upstream.seen) == 5


@pytest.mark.parametrize("dropped_by", ["purge", "eviction"])
async def test_clients_waiting_on_a_revalidation_are_answered_after_their_entry_goes(
    tmp_path: Path, dropped_by: str
) -> None:
    """The stored object is being revalidated (the upstream slow to answer) when a purge or
    an eviction drops its entry. The upstream then says 304: the clients that were waiting
    get the bytes they asked about (they held them), not `503 cached object unavailable`;
    the purge or eviction stands for the next request, which fetches the object again."""
    asked = asyncio.Event()
    answer = asyncio.Event()
    seen: list[httpx.Request] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/g":
            return _ok(b"x" * 30, '"g"')(request)
        if "if-none-match" in request.headers:
            asked.set()
            await answer.wait()
            return httpx.Response(304, headers={"etag": '"e1"', "cache-control": "no-cache"})
        return _ok(V1, '"e1"', "no-cache")(request)

    clock = ManualClock()
    # The disk budget counts blocks, records and directories (cache_dir, objects/, a bucket):
    # room for f (a block of data, one of record) and a block to spare, not for f and g too.
    directory = os.lstat(tmp_path).st_blocks * 512
    block = max(512, os.statvfs(tmp_path).f_frsize)
    config = Config(
        routes=ROUTES,
        cache_dir=str(tmp_path),
        cache_max_bytes=3 * directory + 3 * block,
        cache_max_object_bytes=40,
    )
    app = create_app(config, transport=httpx.MockTransport(handler), clock=clock)

    async def get(path: str) -> Client:
        client = Client()
        await app(http_scope(state, path), client.receive, client.send)
        assert client.completed
        return client

    async with lifespan_state(app) as state:
        assert (await get("/o/f")).body == V1
        waiting = [asyncio.create_task(get("/o/f")) for _ in range(3)]
        await asyncio.wait_for(asked.wait(), 10)
        cache = state["cache"]
        # Every client has joined the revalidation before its entry goes (a client still on
        # the cache's threads when the purge comes would be a miss of its own).
        fill = cache.fill_in_flight(base_key("/o/", b"/o/f", b""), "identity")
        assert fill is not None
        await asyncio.wait_for(_until(lambda: fill.clients.holders == 3), 10)
        if dropped_by == "purge":
            assert cache.purge_key(base_key("/o/", b"/o/f", b"")) == 1
        else:
            assert (await get("/o/g")).body == b"x" * 30  # evicts f: no room for both
        assert cache.lookup(base_key("/o/", b"/o/f", b""), "identity") is None
        answer.set()
        for client in await asyncio.gather(*waiting):
            assert (client.status, client.body) == (200, V1)
            assert _status(client) == "relay; fwd=stale; fwd-status=304"
        again = await get("/o/f")
        assert (again.body, _status(again)) == (V1, "relay; fwd=miss")
        assert "if-none-match" not in seen[-1].headers


async def _until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop (and the cache's threads) until `predicate()`."""
    while not predicate():
        await asyncio.sleep(0.001)


# ---- conditional requests answered from slices and fills -------------------------------------

SLICE = 64 * 1024
BIG = bytes(range(256)) * (2 * SLICE // 256)
LAST_MODIFIED = "Tue, 01 Dec 2026 00:00:00 GMT"


def _ranges(request: httpx.Request) -> httpx.Response:
    """The upstream of a 128 KiB object with byte ranges, an ETag and a Last-Modified."""
    headers = {
        "etag": '"big"',
        "last-modified": LAST_MODIFIED,
        "cache-control": "max-age=600",
        "accept-ranges": "bytes",
    }
    spec = request.headers.get("range")
    if spec is None:
        headers["content-length"] = str(len(BIG))
        return httpx.Response(200, headers=headers, stream=_Body(BIG))
    first, _, last = spec.split("=")[1].partition("-")
    start, stop = int(first), min(int(last) + 1, len(BIG))
    headers["content-range"] = f"bytes {start}-{stop - 1}/{len(BIG)}"
    headers["content-length"] = str(stop - start)
    return httpx.Response(206, headers=headers, stream=_Body(BIG[start:stop]))


@pytest.mark.parametrize("stored", [False, True])
async def test_ranges_from_slices_answer_conditionals_as_whole_objects_do(
    tmp_path: Path, stored: bool
) -> None:
    """A Range answered from slices (stored, or being fetched) goes through the same rules
    as a whole object: an If-None-Match listing its ETag or an If-Modified-Since not older
    than its Last-Modified is a 304 (it was a 206); an If-Range that holds a 206, one that
    does not the whole object (it was relayed)."""
    upstream = Upstream(_ranges)
    relay = Relay(tmp_path, upstream, cache_slice_bytes=SLICE)
    async with lifespan_state(relay.app) as relay.state:
        if stored:
            await relay.get(range=f"bytes=0-{len(BIG) - 1}")
        fetched = len(upstream.seen)
        for conditional in ({"if_none_match": '"other", "big"'}, {"if_none_match": "*"}):
            not_modified = await relay.get(range="bytes=10-19", **conditional)
            assert (not_modified.status, not_modified.body) == (304, b"")
            assert not_modified.headers[b"etag"] == b'"big"'
        since = await relay.get(range="bytes=10-19", if_modified_since=LAST_MODIFIED)
        assert since.status == 304
        changed = await relay.get(range="bytes=10-19", if_none_match='"other"')
        assert (changed.status, changed.body) == (206, BIG[10:20])
        holds = await relay.get(range="bytes=10-19", if_range='"big"')
        assert (holds.status, holds.body) == (206, BIG[10:20])
        whole = await relay.get(range="bytes=10-19", if_range='"old"')
        assert (whole.status, whole.body) == (200, BIG)
        assert b"content-range" not in whole.headers
        if stored:
            assert len(upstream.seen) == fetched  # all of it from the stored slices
            assert _status(not_modified).startswith("relay; hit")
        assert all(not request.headers.get("if-none-match") for request in upstream.seen)


async def test_an_unsized_fill_answers_conditionals(tmp_path: Path) -> None:
    """A miss streamed from a fill of a body without a length (chunked) still honours the
    client's If-None-Match (it was a 200 whatever it asked)."""

    def chunked(request: httpx.Request) -> httpx.Response:
        headers = {"etag": '"c"', "cache-control": "max-age=600", "transfer-encoding": "chunked"}
        return httpx.Response(200, headers=headers, stream=_Body(V1))

    relay = Relay(tmp_path, Upstream(chunked))
    async with lifespan_state(relay.app) as relay.state:
        miss = await relay.get(if_none_match='"c"')
        assert (miss.status, miss.body, _status(miss)) == (304, b"", "relay; fwd=miss")
        assert (await relay.get()).body == V1
