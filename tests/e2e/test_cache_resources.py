"""What the cache owns and holds: upstream connections of fills (resumed ones included), stream
slots, fills no client waits for, and the request cycles of clients that reset. A real relay
under uvicorn in front of the test origin; every test waits on observable state (metrics,
gauges, origin counts), never on a sleep."""

from __future__ import annotations

import contextlib
import gc
import logging
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.config import Route
from relay.server.run import RelayHttpToolsProtocol
from tests.e2e.caching import MakeRelay, cache_metrics, caching_relay
from tests.harness import CURL, RelayThread, abort_download, curl, read_slowly, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> MakeRelay:
    return caching_relay(make_relay, tmp_path)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_client_reset_right_after_asking_for_a_hit_logs_no_error(
    cached: MakeRelay, loop: str
) -> None:
    """Clients that reset right after asking for a cached object over 16 KiB (sent zero-copy):
    an ordinary abort, no uvicorn "returned without completing response" error (the harness
    fails the test on one); the slots are back and the object is still served whole."""
    relay = cached(loop=loop)
    path = f"/o/gen/{MiB}?v=1901&u={uuid.uuid4().hex}"
    assert httpx.get(relay.url + path).status_code == 200
    assert wait_until(lambda: _is_hit(relay, path))
    for _ in range(30):
        abort_download(relay.port, path, 0)  # reset right after asking
    assert wait_until(lambda: relay.streams_active() == 0)
    assert relay.logged_errors() == []
    response = httpx.get(relay.url + path)
    assert response.status_code == 200
    assert len(response.content) == MiB


def _is_hit(relay: RelayThread, path: str) -> bool:
    status: str = httpx.head(relay.url + path).headers.get("cache-status", "")
    return status.startswith("relay; hit")


def upstream_connections(relay: RelayThread, state: str = "in_use") -> int:
    """relay_upstream_connections{state} as /metrics reports it."""
    for line in httpx.get(relay.url + "/metrics").text.splitlines():
        if line.startswith(f'relay_upstream_connections{{state="{state}"}}'):
            return int(float(line.split()[-1]))
    raise AssertionError("relay_upstream_connections not reported")


def test_a_resumed_fill_stopped_by_its_last_client_leaving_closes_its_connection(
    cached: MakeRelay, origin: Origin
) -> None:
    """A fill whose upstream body was cut and resumed, then stopped because its only client
    left (cache_fill_idle_timeout 0): the resumed response is closed with it, so no upstream
    connection stays checked out (aiohttp: the slot would be held for good, and an "Unclosed
    connection" error logged when it is collected), and nothing is published."""
    relay = cached(transport="aiohttp", cache_fill_idle_timeout=0.0)
    size = 16 * MiB
    key = uuid.uuid4().hex
    path = f"/o/gen/{size}?v=1801&drop_once={MiB}&key={key}&slow={4 * MiB}"
    before = cache_metrics(relay)
    # Past the cut: the bytes after the first MiB come from the resumed response.
    abort_download(relay.port, path, 2 * MiB)
    assert wait_until(
        lambda: cache_metrics(relay)["fills_failed_total"] == before["fills_failed_total"] + 1
    )
    asked = [r for r in origin.requests if key in r.target]
    assert [r.header("range") for r in asked] == [None, f"bytes={MiB}-{size - 1}"]  # cut, resumed
    assert wait_until(lambda: upstream_connections(relay) == 0), upstream_connections(relay)
    relay.call(gc.collect)
    assert relay.logged_errors() == []
    assert cache_metrics(relay)["objects"] == before["objects"]


@pytest.fixture
def own_origin() -> Iterator[Origin]:
    """An origin of the test's own: stopping it ends fills stalled on it (a stalled upstream
    holds its connection until the read timeout), so the test leaves nothing running."""
    with Origin() as server:
        yield server


def _two_routes(origin: Origin) -> tuple[Route, Route]:
    """/o/ cached, /p/ relayed (cache = false), both to `origin`."""
    return (
        Route(prefix="/o/", upstream=origin.url + "/", allow_private=True),
        Route(prefix="/p/", upstream=origin.url + "/", allow_private=True, cache=False),
    )


def _abandon_fills(relay: RelayThread, count: int, tag: str) -> None:
    """`count` clients each ask for a distinct large object (the upstream stalls after 256 KiB,
    so its fill holds its connection), read 64 KiB of it and reset: fills nobody waits for."""
    for i in range(count):
        abort_download(relay.port, f"/o/gen/{64 * MiB}?stall_after=256k&u={tag}-{i}", 64 * 1024)


def test_fills_whose_clients_left_do_not_lock_clients_out(
    cached: MakeRelay, own_origin: Origin
) -> None:
    """Issue 21, item 11: with max_connections = 3, three clients drop large downloads of three
    distinct objects. Fills without a client are bounded (by default a quarter of the pool, at
    least one): one runs on, the other two stop (nothing stored); every later request, relayed
    or through the cache, is answered."""
    relay = cached(
        routes=_two_routes(own_origin), max_connections=3, resume_attempts=0, admin_token="t"
    )
    before = cache_metrics(relay)
    _abandon_fills(relay, 3, uuid.uuid4().hex)
    assert wait_until(
        lambda: (
            cache_metrics(relay)["background_stopped_total"]
            == before["background_stopped_total"] + 2
        )
    )
    assert cache_metrics(relay)["background_fills"] == 1
    assert cache_metrics(relay)["max_background_fills"] == 1  # a quarter of 3, at least one
    assert upstream_connections(relay) == 1
    for path in ("/p/gen/1k", f"/o/gen/2k?u={uuid.uuid4().hex}", "/p/gen/3k"):
        response = httpx.get(relay.url + path, timeout=30)
        assert response.status_code == 200, (path, response.text)
    # Nor is another fill started without a client: a prefetch is refused for now.
    prefetch = httpx.post(
        relay.url + "/cache/prefetch",
        json={"path": f"/o/gen/4k?u={uuid.uuid4().hex}"},
        headers={"x-relay-admin-token": "t"},
    )
    assert prefetch.status_code == 503
    assert prefetch.headers["retry-after"] == "5"
    own_origin.stop()  # the stalled fill fails: nothing left running
    assert cache_metrics(relay)["objects"] == before["objects"] + 1  # the 2k miss only


def test_a_client_request_stops_a_fill_nobody_waits_for_when_the_pool_is_full(
    cached: MakeRelay, own_origin: Origin
) -> None:
    """Fills without a client allowed the whole pool (cache_background_fills 3, share 1.0):
    three abandoned fills hold all three upstream connections. A client's request then stops
    one of them (nothing of it stored) and gets its connection, instead of waiting for the
    pool and a 503; one stop is enough, the other two fills run on."""
    relay = cached(
        routes=_two_routes(own_origin),
        max_connections=3,
        resume_attempts=0,
        cache_background_fills=3,
        cache_background_share=1.0,
    )
    before = cache_metrics(relay)
    _abandon_fills(relay, 3, uuid.uuid4().hex)
    assert wait_until(lambda: upstream_connections(relay) == 3)
    assert cache_metrics(relay)["background_fills"] == 3
    assert cache_metrics(relay)["max_background_fills"] == 3
    # First a miss: its fill has a client waiting, so it waits for a connection as the
    # client's own request would (and makes room), unlike a fill nobody waits for.
    for path in (f"/o/gen/2k?u={uuid.uuid4().hex}", "/p/gen/1k"):
        response = httpx.get(relay.url + path, timeout=30)
        assert response.status_code == 200, (path, response.text)
    after = cache_metrics(relay)
    assert after["background_stopped_total"] == before["background_stopped_total"] + 1
    assert after["background_fills"] == 2
    assert after["objects"] == before["objects"] + 1  # the 2k miss only
    own_origin.stop()


def test_a_fill_nobody_waits_for_never_waits_for_a_connection(
    cached: MakeRelay, own_origin: Origin
) -> None:
    """Every upstream connection is taken by clients (three relayed downloads waiting on a
    stalled upstream) when a prefetch starts a fill: the fill does not queue for a connection
    (it would take the next one freed ahead of any client's request), it ends at once
    (`relay_cache_background_fills` back to 0) and never reaches the upstream, even once the
    clients' connections are free."""
    relay = cached(
        routes=_two_routes(own_origin), max_connections=3, pool_timeout=60.0, admin_token="t"
    )
    tag = uuid.uuid4().hex
    objects = cache_metrics(relay)["objects"]
    with contextlib.ExitStack() as clients:
        for i in range(3):
            sock = clients.enter_context(socket.create_connection(("127.0.0.1", relay.port)))
            sock.sendall(
                f"GET /p/gen/{64 * MiB}?stall_after=256k&u={tag}-{i} HTTP/1.1\r\n"
                "Host: relay\r\n\r\n".encode()
            )
        assert wait_until(lambda: upstream_connections(relay) == 3)
        prefetch = httpx.post(
            relay.url + "/cache/prefetch",
            json={"path": f"/o/gen/4k?u={tag}"},
            headers={"x-relay-admin-token": "t"},
        )
        assert prefetch.status_code == 202
        assert wait_until(lambda: cache_metrics(relay)["background_fills"] == 0)
    assert wait_until(lambda: upstream_connections(relay) == 0)
    assert [r for r in own_origin.requests if r.target == f"/gen/4k?u={tag}"] == []
    assert cache_metrics(relay)["objects"] == objects


@pytest.mark.parametrize("answer", ["hit, zero-copy", "hit, read", "miss, from the fill"])
def test_min_send_rate_cuts_a_slow_reader_of_a_cache_answer(
    cached: MakeRelay,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    answer: str,
) -> None:
    """A client reading about 40 KB/s against a 256 KB/s min_send_rate (window 0.5 s), as
    relayed streams are judged: cut after the grace window, whichever pump sends the cache's
    answer (sendfile, reads of a stored file, reads behind a fill), its slot given back."""
    caplog.set_level(logging.INFO, logger="relay.access")
    if answer == "hit, read":
        monkeypatch.setattr(RelayHttpToolsProtocol, "zero_copy", False)
    relay = cached(min_send_rate=256_000, min_rate_window=0.5)
    path = f"/o/gen/{64 * MiB}?u={uuid.uuid4().hex}"
    if answer.startswith("hit"):
        assert len(httpx.get(relay.url + path, timeout=60).content) == 64 * MiB
        assert wait_until(lambda: _is_hit(relay, path))
    before = cache_metrics(relay)
    received, ending = read_slowly(relay.port, path)
    assert ending == "reset", (ending, received)
    assert received < 64 * MiB
    assert wait_until(lambda: relay.streams_active() == 0)
    assert any("fewer than 256000 bytes/s" in r.getMessage() for r in caplog.records)
    assert wait_until(
        lambda: any(
            r.name == "relay.access" and "client_slow" in r.getMessage() for r in caplog.records
        )
    )
    zero_copy = cache_metrics(relay)["bytes_zero_copy_total"] - before["bytes_zero_copy_total"]
    assert (zero_copy > 0) == (answer == "hit, zero-copy")


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_min_send_rate_judges_the_client_not_a_slow_fill(cached: MakeRelay) -> None:
    """The rate judges the client only: a client keeping up with a fill from a slow upstream
    (100 KB/s, under the 256 KB/s minimum) gets the whole body, and so does a fast client of
    a hit, zero-copy."""
    relay = cached(min_send_rate=256_000, min_rate_window=0.5)
    tag = uuid.uuid4().hex
    code, digest, size = curl(f"{relay.url}/o/gen/200000?slow=100000&u={tag}")
    assert (code, size, digest) == (0, 200000, expected_sha256(200000))
    path = f"/o/gen/{64 * MiB}?u={tag}"
    assert len(httpx.get(relay.url + path, timeout=60).content) == 64 * MiB
    assert wait_until(lambda: _is_hit(relay, path))
    code, digest, size = curl(relay.url + path)
    assert (code, digest) == (0, expected_sha256(64 * MiB))
