"""What one fill shares: its answer reaches the clients waiting on it whatever the upstream
said (one upstream request), except where sharing is wrong; a pass only where it is; a purge
covers what is being filled. The app over httpx.MockTransport, time from a ManualClock."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from relay import Config, Route, create_app
from relay.cache.cache import PASS_SECONDS, Cache
from relay.cache.clock import ManualClock
from relay.cache.key import base_key
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)
BODY = b"the upstream's bytes\n"


class _Body(httpx.AsyncByteStream):
    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self._data


class Upstream:
    """Answers every request with `status`, `headers` and BODY once `gate` is open."""

    def __init__(self, status: int = 200, **headers: str) -> None:
        self.status = status
        self.headers = {"content-length": str(len(BODY)), **headers}
        self.seen: list[httpx.Request] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        await self.gate.wait()
        return httpx.Response(self.status, headers=self.headers, stream=_Body(BODY))

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)


async def _until(predicate: Callable[[], bool]) -> None:
    """Let the loop run until `predicate` holds (bounded: a stuck test fails, never hangs)."""
    for _ in range(10_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("the state never came")


class Relay:
    def __init__(self, app: Any, state: dict[str, Any], clock: ManualClock) -> None:
        self.app = app
        self.state = state
        self.clock = clock
        self.cache: Cache = state["cache"]

    def get(self, path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Awaitable[Client]:
        async def run() -> Client:
            client = Client()
            scope = http_scope(self.state, path, headers=headers)
            await self.app(scope, client.receive, client.send)
            return client

        return asyncio.ensure_future(run())

    def holders(self, path: str) -> int:
        fill = self.cache.fills.get(base_key("/o/", path.encode(), b""))
        return fill.clients.holders if fill is not None else 0


@contextlib.asynccontextmanager
async def _relay(tmp_path: Path, upstream: Upstream, **settings: Any) -> AsyncIterator[Relay]:
    clock = ManualClock()
    config = Config(routes=ROUTES, cache_dir=str(tmp_path), cache_max_bytes=1 << 20, **settings)
    app = create_app(config, transport=upstream.transport(), clock=clock)
    async with lifespan_state(app) as state:
        relay = Relay(app, state, clock)
        yield relay
        assert relay.cache.fills == {}
    assert not list(tmp_path.rglob("*.partial"))


async def _together(relay: Relay, upstream: Upstream, path: str, count: int) -> list[Client]:
    """`count` clients of `path` at once, all attached to one fill before it is answered."""
    upstream.gate.clear()
    clients = [relay.get(path) for _ in range(count)]
    await _until(lambda: relay.holders(path) == count and len(upstream.seen) == 1)
    upstream.gate.set()
    return list(await asyncio.gather(*clients))


def _status(client: Client) -> str | None:
    value = client.headers.get(b"cache-status")
    return value.decode() if value is not None else None


async def test_clients_waiting_on_a_fill_share_its_error(tmp_path: Path) -> None:
    """Three clients waiting on one fill answered 503 cost one request and all get the 503;
    no pass follows: the next request is filled again (and stored if it then may be)."""
    upstream = Upstream(503)
    async with _relay(tmp_path, upstream) as relay:
        answers = await _together(relay, upstream, "/o/f", 3)
        assert [(a.status, a.body) for a in answers] == [(503, BODY)] * 3
        assert {_status(a) for a in answers} == {"relay; fwd=miss; fwd-status=503"}
        assert {a.headers[b"content-length"] for a in answers} == {str(len(BODY)).encode()}
        assert len(upstream.seen) == 1
        upstream.status = 200
        upstream.headers["cache-control"] = "max-age=60"
        stored = await relay.get("/o/f")
        assert (stored.status, _status(stored)) == (200, "relay; fwd=miss")
        hit = await relay.get("/o/f")
        assert _status(hit) == "relay; hit; ttl=60"
        assert len(upstream.seen) == 2


async def test_an_answer_for_one_client_reaches_one_waiting_client(tmp_path: Path) -> None:
    """`private`: the first client waiting on the fill gets its answer, the others are relayed
    each on their own, and so is every request until the pass expires."""
    upstream = Upstream(200, **{"cache-control": "private, max-age=60"})
    async with _relay(tmp_path, upstream) as relay:
        answers = await _together(relay, upstream, "/o/p", 3)
        assert [a.body for a in answers] == [BODY] * 3
        assert [_status(a) for a in answers] == ["relay; fwd=miss; fwd-status=200", None, None]
        assert len(upstream.seen) == 3
        relayed = await relay.get("/o/p")
        assert _status(relayed) is None
        relay.clock.advance(PASS_SECONDS + 1)
        again = await relay.get("/o/p")
        assert _status(again) == "relay; fwd=miss; fwd-status=200"
        assert len(upstream.seen) == 5


async def test_a_set_cookie_answer_is_for_one_client(tmp_path: Path) -> None:
    upstream = Upstream(200, **{"set-cookie": "session=1", "cache-control": "max-age=60"})
    async with _relay(tmp_path, upstream) as relay:
        answers = await _together(relay, upstream, "/o/c", 2)
        assert [_status(a) for a in answers] == ["relay; fwd=miss; fwd-status=200", None]
        assert all(b"set-cookie" not in a.headers for a in answers)
        assert len(upstream.seen) == 2


async def test_an_answer_varying_beyond_the_key_answers_no_client(tmp_path: Path) -> None:
    """Vary: User-Agent: the fill sent relay's User-Agent, not the client's (RFC 9111 4.1)."""
    upstream = Upstream(200, vary="User-Agent", **{"cache-control": "max-age=60"})
    async with _relay(tmp_path, upstream) as relay:
        answer = await relay.get("/o/v", [(b"host", b"relay.test"), (b"user-agent", b"pip/25")])
        assert (answer.status, answer.body, _status(answer)) == (200, BODY, None)
        assert [r.headers["user-agent"] for r in upstream.seen] == [
            upstream.seen[0].headers["user-agent"],
            "pip/25",
        ]
        assert upstream.seen[0].headers["user-agent"].startswith("relay/")


async def test_a_shared_redirect_is_mapped_onto_relays_route(tmp_path: Path) -> None:
    """A 302 answered to a fill reaches its clients as the relayed path would send it."""
    upstream = Upstream(302, location="http://upstream.test/elsewhere?x=1")
    async with _relay(tmp_path, upstream) as relay:
        answers = await _together(relay, upstream, "/o/r", 2)
        assert {a.headers[b"location"] for a in answers} == {b"/o/elsewhere?x=1"}
        assert {a.status for a in answers} == {302}
        assert len(upstream.seen) == 1


async def test_a_head_gets_a_shared_answers_head(tmp_path: Path) -> None:
    upstream = Upstream(404)
    async with _relay(tmp_path, upstream) as relay:
        upstream.gate.clear()
        get = relay.get("/o/h")
        await _until(lambda: relay.holders("/o/h") == 1)

        async def head() -> Client:
            client = Client()
            scope = http_scope(relay.state, "/o/h", method="HEAD")
            await relay.app(scope, client.receive, client.send)
            return client

        headed = asyncio.ensure_future(head())
        await _until(lambda: relay.holders("/o/h") == 2)
        upstream.gate.set()
        got, answered = await get, await headed
        assert (got.status, got.body) == (404, BODY)
        assert (answered.status, answered.body) == (404, b"")
        assert answered.headers[b"content-length"] == str(len(BODY)).encode()
        assert len(upstream.seen) == 1


async def test_a_purge_covers_a_fill_in_flight(tmp_path: Path) -> None:
    """Purged while its upstream answer is pending: the fill still answers its client, whole,
    but stores nothing, so the next request fetches again."""
    upstream = Upstream(200, **{"cache-control": "max-age=60"})
    async with _relay(tmp_path, upstream) as relay:
        upstream.gate.clear()
        first = relay.get("/o/x")
        await _until(lambda: relay.holders("/o/x") == 1 and len(upstream.seen) == 1)
        assert relay.cache.purge_key(base_key("/o/", b"/o/x", b"")) == 1
        upstream.gate.set()
        answered = await first
        assert (answered.status, answered.body) == (200, BODY)
        assert _status(answered) == "relay; fwd=miss; fwd-status=200"  # purged: not stored
        await _until(lambda: not relay.cache.fills)
        assert relay.cache.lookup(base_key("/o/", b"/o/x", b""), "identity") is None
        again = await relay.get("/o/x")
        assert _status(again) == "relay; fwd=miss"
        assert len(upstream.seen) == 2


async def test_the_fills_read_descriptor_outlives_it_until_its_last_reader(
    tmp_path: Path,
) -> None:
    """A reader that joined before the answer came can read it however soon the fill ends (its
    file's name removed): the descriptor closes with the last reader."""
    upstream = Upstream(503)
    async with _relay(tmp_path, upstream) as relay:
        opened = len(os.listdir("/proc/self/fd"))
        answers = await _together(relay, upstream, "/o/d", 2)
        assert [a.body for a in answers] == [BODY, BODY]
        await _until(lambda: not relay.cache.fills)
        assert len(os.listdir("/proc/self/fd")) == opened


async def test_an_answer_the_file_cannot_hold_is_handed_to_one_client(tmp_path: Path) -> None:
    """A Content-Length over cache_max_object_bytes: the fill's open response is relayed to the
    first client waiting on it (the fill's request, once), the other is relayed on its own,
    and later requests pass: never a second request for the client that caused it."""
    upstream = Upstream(200, **{"cache-control": "max-age=60"})
    async with _relay(tmp_path, upstream, cache_max_object_bytes=8) as relay:
        answers = await _together(relay, upstream, "/o/u", 2)
        assert [(a.status, a.body, _status(a)) for a in answers] == [(200, BODY, None)] * 2
        assert ["x-forwarded-proto" in r.headers for r in upstream.seen] == [
            False,  # the fill's (built from the key), handed over
            True,  # the other client's own
        ]
        later = await relay.get("/o/u")
        assert (later.body, _status(later)) == (BODY, None)
        assert len(upstream.seen) == 3
        assert relay.cache.lookup(base_key("/o/", b"/o/u", b""), "identity") is None
