"""What the cache owns and holds: upstream connections of fills (resumed ones included), stream
slots, fills no client waits for, and the request cycles of clients that reset. A real relay
under uvicorn in front of the test origin; every test waits on observable state (metrics,
gauges, origin counts), never on a sleep."""

from __future__ import annotations

import socket
import struct
import uuid
from pathlib import Path

import httpx
import pytest

from tests.e2e.caching import MakeRelay, caching_relay
from tests.harness import RelayThread, wait_until

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
