"""What the cache owns and holds: upstream connections of fills (resumed ones included), stream
slots, fills no client waits for, and the request cycles of clients that reset. A real relay
under uvicorn in front of the test origin; every test waits on observable state (metrics,
gauges, origin counts), never on a sleep."""

from __future__ import annotations

import gc
import socket
import struct
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.caching import MakeRelay, cache_metrics, caching_relay
from tests.harness import RelayThread, wait_until
from tests.origin import Origin

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> MakeRelay:
    return caching_relay(make_relay, tmp_path)


def _reset_right_after(port: int, path: str) -> None:
    """Ask for `path` and reset the connection (RST) without reading anything."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


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
        _reset_right_after(relay.port, path)
    assert wait_until(lambda: relay.streams_active() == 0)
    assert relay.logged_errors() == []
    response = httpx.get(relay.url + path)
    assert response.status_code == 200
    assert len(response.content) == MiB


def _is_hit(relay: RelayThread, path: str) -> bool:
    return httpx.head(relay.url + path).headers.get("cache-status", "").startswith("relay; hit")


def upstream_connections(relay: RelayThread, state: str = "in_use") -> int:
    """relay_upstream_connections{state} as /metrics reports it."""
    for line in httpx.get(relay.url + "/metrics").text.splitlines():
        if line.startswith(f'relay_upstream_connections{{state="{state}"}}'):
            return int(float(line.split()[-1]))
    raise AssertionError("relay_upstream_connections not reported")


def _read_then_reset(port: int, path: str, nbytes: int) -> None:
    """Ask for `path`, read at least `nbytes` of the response, then reset the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        got = 0
        while got < nbytes:
            chunk = sock.recv(65536)
            assert chunk, "relay closed the connection"
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


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
    _read_then_reset(relay.port, path, 2 * MiB)
    assert wait_until(
        lambda: cache_metrics(relay)["fills_failed_total"] == before["fills_failed_total"] + 1
    )
    asked = [r for r in origin.requests if key in r.target]
    assert [r.header("range") for r in asked] == [None, f"bytes={MiB}-{size - 1}"]  # cut, resumed
    assert wait_until(lambda: upstream_connections(relay) == 0), upstream_connections(relay)
    relay.call(gc.collect)
    assert relay.logged_errors() == []
    assert cache_metrics(relay)["objects"] == before["objects"]
