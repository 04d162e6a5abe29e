"""Cache hits sent zero-copy (sendfile through relay's protocol), end to end: a real relay under
uvicorn in front of the test origin. Every test proves which path ran by the
`relay_cache_bytes_zero_copy_total` counter: a test that passed on the pread fallback would
not be a test of sendfile."""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from relay.cache.delivery import INLINE_READ
from relay.server.run import RelayHttpToolsProtocol
from tests.e2e.caching import MakeRelay, caching_relay, stored_data
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.harness import RelayThread, abort_download, curl, wait_until
from tests.origin import body_bytes, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture(params=["uvloop", "asyncio"])
def cached(
    request: pytest.FixtureRequest, make_relay: MakeRelay, tmp_path: Path
) -> Callable[..., RelayThread]:
    """A caching relay on each event loop (the writability wait differs: libuv or epoll)."""

    return caching_relay(make_relay, tmp_path, loop=request.param)


def _zero_copy(relay: RelayThread) -> int:
    return int(_cache_metrics(relay)["bytes_zero_copy_total"])


def _warm(relay: RelayThread, path: str) -> None:
    """Fetch until the object is a hit (the first GET fills it)."""

    def hit() -> bool:
        response = httpx.get(relay.url + path, timeout=60)
        assert response.status_code == 200
        return response.headers["cache-status"].startswith("relay; hit")

    assert wait_until(hit, timeout=30)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _read_response(sock: socket.socket, buffered: bytes) -> tuple[bytes, bytes, bytes]:
    """One Content-Length response from a kept-alive connection: (head, body, what follows)."""
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, "connection closed before the head"
        data += chunk
    head, _, data = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    digest = hashlib.sha256()
    body = bytearray(data[:length])
    rest = data[length:]
    while len(body) < length:
        chunk = sock.recv(min(1 << 20, length - len(body)))
        assert chunk, "connection closed mid-body"
        body += chunk
    digest.update(body)
    return head, bytes(body), rest


def test_a_hit_goes_out_zero_copy_byte_exact(cached: Callable[..., RelayThread]) -> None:
    """A whole hit is sent with sendfile: sha256-exact, with its Content-Length; HEAD sends
    no body."""
    relay = cached()
    size = 8 * MiB + 12345
    path = f"/o/gen/{size}?v=201"
    _warm(relay, path)
    before = _zero_copy(relay)
    code, digest, length = curl(relay.url + path)
    assert (code, length, digest) == (0, size, expected_sha256(size))
    assert _zero_copy(relay) - before == size
    head = httpx.head(relay.url + path)
    assert head.status_code == 200
    assert head.headers["content-length"] == str(size)
    assert head.headers["cache-status"].startswith("relay; hit")
    assert _zero_copy(relay) - before == size
    assert relay.streams_active() == 0


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (0, 0),
        (1, INLINE_READ),
        (1, INLINE_READ + 1),
        (65535, 3 * MiB + 1),
        (4 * MiB - 7, 4 * MiB + 12344),
        (123457, None),
    ],
)
def test_ranges_of_a_hit_go_out_zero_copy(
    cached: Callable[..., RelayThread], first: int, last: int | None
) -> None:
    """Ranges of a hit at odd offsets: 206, the right Content-Range, exactly those bytes;
    zero-copy above INLINE_READ bytes (a smaller one leaves with its head in one write)."""
    relay = cached()
    size = 4 * MiB + 12345
    path = f"/o/gen/{size}?v=202"
    _warm(relay, path)
    before = _zero_copy(relay)
    spec = f"bytes={first}-{'' if last is None else last}"
    response = httpx.get(relay.url + path, headers={"Range": spec})
    stop = size if last is None else last + 1
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {first}-{stop - 1}/{size}"
    assert response.headers["content-length"] == str(stop - first)
    assert response.headers["cache-status"].startswith("relay; hit")
    assert response.content == body_bytes(size, first, stop)
    zero_copy = stop - first if stop - first > INLINE_READ else 0
    assert _zero_copy(relay) - before == zero_copy


def test_the_connection_is_kept_alive_after_zero_copy_hits(
    cached: Callable[..., RelayThread],
) -> None:
    """Three requests on one connection after zero-copy bodies: each response is framed
    exactly (uvicorn's Content-Length count and keep-alive hold), and the connection stays."""
    relay = cached()
    size = 2 * MiB + 3
    path = f"/o/gen/{size}?v=203"
    _warm(relay, path)
    before = _zero_copy(relay)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        head, body, rest = _read_response(sock, b"")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert hashlib.sha256(body).hexdigest() == expected_sha256(size)
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: relay\r\nRange: bytes=5-1000004\r\n\r\n".encode()
        )
        head, body, rest = _read_response(sock, rest)
        assert head.startswith(b"HTTP/1.1 206 ")
        assert body == body_bytes(size, 5, 1000005)
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
        head, _, rest = _read_response(sock, rest)
        assert head.startswith(b"HTTP/1.1 200 ")
        assert rest == b""
    assert _zero_copy(relay) - before == size + 1000000


def test_a_reader_that_stops_is_cut_after_send_timeout(
    cached: Callable[..., RelayThread],
) -> None:
    """A client that stops reading a zero-copy hit is cut (reset) once send_timeout passes
    without progress: its slot is released, it never gets the whole body."""
    relay = cached(send_timeout=1.0)
    size = 64 * MiB
    path = f"/o/gen/{size}?v=204"
    _warm(relay, path)
    before = _zero_copy(relay)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        assert wait_until(lambda: relay.streams_active() == 1)
        # Stop reading: relay fills the socket buffers, waits send_timeout, then resets.
        assert wait_until(lambda: relay.streams_active() == 0, timeout=30)
        received = 0
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        assert received < size
    sent = _zero_copy(relay) - before
    assert 0 < sent < size


def test_a_client_gone_mid_sendfile_releases_its_slot_and_file(
    cached: Callable[..., RelayThread],
) -> None:
    """A client that resets the connection in the middle of a zero-copy hit: the stream slot,
    the object's file and the socket are released at once (the process's open files are back
    to what they were)."""
    relay = cached()
    size = 64 * MiB
    path = f"/o/gen/{size}?v=205"
    _warm(relay, path)
    before = _zero_copy(relay)
    assert wait_until(lambda: relay.streams_active() == 0)
    baseline = _open_fds()
    for _ in range(5):
        abort_download(relay.port, path, 2 * MiB)
    assert wait_until(lambda: relay.streams_active() == 0)
    assert wait_until(lambda: _open_fds() <= baseline), (_open_fds(), baseline)
    sent = _zero_copy(relay) - before
    assert 0 < sent < 5 * size
    code, digest, length = curl(relay.url + path)
    assert (code, length, digest) == (0, size, expected_sha256(size))


def test_hits_fall_back_to_reads_without_the_extension(
    cached: Callable[..., RelayThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the server offers no zero-copy send, a hit is read and sent as before: the same
    bytes, none of them zero-copy."""
    monkeypatch.setattr(RelayHttpToolsProtocol, "zero_copy", False)
    relay = cached()
    size = 8 * MiB + 12345
    path = f"/o/gen/{size}?v=206"
    _warm(relay, path)
    before = _cache_metrics(relay)
    code, digest, length = curl(relay.url + path)
    assert (code, length, digest) == (0, size, expected_sha256(size))
    response = httpx.get(relay.url + path, headers={"Range": "bytes=3-70000"})
    assert response.status_code == 206
    assert response.content == body_bytes(size, 3, 70001)
    after = _cache_metrics(relay)
    assert after["bytes_zero_copy_total"] == 0
    assert after["bytes_from_cache_total"] - before["bytes_from_cache_total"] == size + 69998


def test_a_client_reading_slowly_gets_every_byte(cached: Callable[..., RelayThread]) -> None:
    """A slow but steady reader of a zero-copy hit (sendfile waits for writability many times)
    gets the whole body, exact."""
    relay = cached()
    size = 6 * MiB
    path = f"/o/gen/{size}?v=207"
    _warm(relay, path)
    before = _zero_copy(relay)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.settimeout(30)
        sock.connect(("127.0.0.1", relay.port))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while True:
            chunk = sock.recv(256 * 1024)
            if not chunk:
                break
            data += chunk
            if len(data) < 2 * MiB:
                time.sleep(0.002)
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert hashlib.sha256(body).hexdigest() == expected_sha256(size)
    assert _zero_copy(relay) - before == size


def test_a_cached_file_cut_short_on_disk_aborts_the_transfer(
    cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A stored file shortened behind relay's back (an outside hand): sendfile reaches its end
    before Content-Length; the client's transfer is aborted, never ended cleanly short."""
    relay = cached()
    size = 4 * MiB
    path = f"/o/gen/{size}?v=208"
    _warm(relay, path)
    (data,) = stored_data(tmp_path / "cache")
    os.truncate(data, size // 2)
    before = _zero_copy(relay)
    code, _, length = curl(relay.url + path)
    assert code in (18, 56)
    assert length < size
    assert 0 < _zero_copy(relay) - before < size
