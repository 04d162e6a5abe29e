"""End to end over loopback: hostile client requests (issue 9) get a clear 4xx or are cut, and
never keep a stream slot, a connection or an upstream connection."""

from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from tests.harness import CURL, RelayThread, curl, raw_http, read_slowly, status_of, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e


STATUS_LINE = re.compile(rb"HTTP/1\.[01] \d{3} ")


def seen(origin: Origin, marker: str) -> list[str]:
    return [r.target for r in origin.requests if marker in r.target]


def limiter_of(relay: RelayThread) -> StreamLimiter:
    assert relay.server is not None
    app = relay.server.config.app
    assert isinstance(app, Starlette)
    limiter = app.state.limiter
    assert isinstance(limiter, StreamLimiter)
    return limiter


def active_streams(relay: RelayThread) -> int:
    """The stream limiter's count of slots taken, read on relay's loop."""
    limiter = limiter_of(relay)
    count: int = relay.call(lambda: limiter.active)
    return count


def body_of(response: bytes) -> bytes:
    return response.partition(b"\r\n\r\n")[2]


# -- finding 1: header bytes >= 0x80 -----------------------------------------------------------

OBS_TEXT_HEADERS = {
    "user-agent": b"User-Agent: caf\xe9\r\n",
    "host": b"",  # the Host line itself carries the byte
    "via": b"Via: 1.1 caf\xe9\r\n",
    "range": b"Range: bytes=0-\xe9\r\n",
    "accept": b"Accept: text/caf\xe9\r\n",
    "if-none-match": b'If-None-Match: "caf\xe9"\r\n',
    "utf-8 user-agent": "User-Agent: café\r\n".encode(),
}


@pytest.mark.parametrize("name", sorted(OBS_TEXT_HEADERS))
def test_non_ascii_forwarded_header_gets_400_and_gives_its_slot_back(
    make_relay: Callable[..., RelayThread], origin: Origin, name: str
) -> None:
    """A forwarded header with bytes >= 0x80 is refused with 400 (never a 500), the upstream is
    not contacted, and max_streams such requests leave every slot free."""
    relay = make_relay(max_streams=2)
    marker = uuid.uuid4().hex
    host = b"Host: caf\xe9\r\n" if name == "host" else b"Host: r\r\n"
    request = (
        f"GET /o/gen/10?m={marker} HTTP/1.1\r\n".encode()
        + host
        + OBS_TEXT_HEADERS[name]
        + b"Connection: close\r\n\r\n"
    )
    for _ in range(3):
        response = raw_http(relay.port, request)
        assert status_of(response) == 400, response[:300]
        assert b"non-ASCII" in body_of(response)
        assert b"Traceback" not in response
    assert not seen(origin, marker)
    assert active_streams(relay) == 0
    assert httpx.get(f"{relay.url}/o/gen/10").status_code == 200


def test_non_ascii_forwarded_for_from_a_trusted_proxy_gets_400(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(trusted_proxies="127.0.0.1", max_streams=1)
    marker = uuid.uuid4().hex
    request = (
        f"GET /o/gen/10?m={marker} HTTP/1.1\r\nHost: r\r\n".encode()
        + b"X-Forwarded-For: 6.6.6.\xe9\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw_http(relay.port, request)) == 400
    assert status_of(raw_http(relay.port, request)) == 400
    assert not seen(origin, marker)
    assert active_streams(relay) == 0


def test_non_ascii_in_a_header_relay_does_not_forward_is_ignored(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    request = (
        f"GET /o/gen/10?m={marker} HTTP/1.1\r\nHost: r\r\n".encode()
        + b"X-Note: caf\xe9\r\nConnection: close\r\n\r\n"
    )
    assert status_of(raw_http(relay.port, request)) == 200
    (record,) = [r for r in origin.requests if marker in r.target]
    assert not record.has_header("x-note")


def test_stream_slot_is_released_when_building_the_upstream_request_fails(
    make_relay: Callable[..., RelayThread], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ownership, not the one exception: whatever fails between taking a slot and streaming,
    the response that took the slot gives it back."""
    relay = make_relay(max_streams=1)

    def broken(*args: object, **kwargs: object) -> httpx.Request:
        raise RuntimeError("unforeseen")

    logging.getLogger("uvicorn.error").disabled = True
    try:
        with monkeypatch.context() as patch:
            patch.setattr(Upstream, "build_request", broken)
            for _ in range(3):
                assert httpx.get(f"{relay.url}/o/gen/10").status_code == 500
    finally:
        logging.getLogger("uvicorn.error").disabled = False
    assert active_streams(relay) == 0
    assert httpx.get(f"{relay.url}/o/gen/10").status_code == 200


# -- finding 4: request bodies -------------------------------------------------------------

BODY_ON_GET = {
    "get content-length": (
        b"GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nContent-Length: 16000\r\n\r\n"
    ),
    "get chunked": (
        b"GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n1\r\n"
    ),
    "head content-length": b"HEAD /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BODY_ON_GET))
def test_get_or_head_with_a_body_gets_400_at_once(
    make_relay: Callable[..., RelayThread], origin: Origin, name: str
) -> None:
    """The body is not waited for: 400 and a closed connection right after the headers."""
    relay = make_relay(body_timeout=60.0, keepalive_timeout=60.0)
    marker = uuid.uuid4().hex
    response = raw_http(relay.port, BODY_ON_GET[name].replace(b"{m}", marker.encode()))
    assert status_of(response) == 400
    assert b"must not have a body" in body_of(response)
    assert not seen(origin, marker)


def test_get_with_an_empty_content_length_is_served(make_relay: Callable[..., RelayThread]) -> None:
    relay = make_relay()
    request = b"GET /o/gen/10 HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    assert status_of(raw_http(relay.port, request)) == 200


def _trickle(port: int, head: bytes, *, limit: int = 200) -> tuple[bytes, bool]:
    """Send head, then one body byte every 0.05 s until relay closes the connection (bounded:
    `limit` bytes). Returns what relay sent and whether it closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        sock.settimeout(0.05)
        received = b""
        for _ in range(limit):
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                try:
                    sock.sendall(b"x")
                except OSError:
                    return received, True
                continue
            except ConnectionResetError:
                return received, True
            if not chunk:
                return received, True
            received += chunk
        return received, False


@pytest.fixture
def downloads_relay(make_relay: Callable[..., RelayThread], tmp_path: Path) -> RelayThread:
    return make_relay(data_dir=str(tmp_path), body_timeout=1.0, header_timeout=30.0)


def test_trickled_download_request_body_gets_408_after_body_timeout(
    downloads_relay: RelayThread,
) -> None:
    head = (
        b"POST /downloads HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: 16000\r\n\r\n{"
    )
    response, closed = _trickle(downloads_relay.port, head)
    assert status_of(response) == 408
    assert len(STATUS_LINE.findall(response)) == 1
    assert closed


def test_trickled_body_after_an_early_answer_is_not_kept_open(
    make_relay: Callable[..., RelayThread],
) -> None:
    """A POST to a relayed path is answered (405) without its body being read; the rest of
    the body, trickled, cannot hold the connection past body_timeout."""
    relay = make_relay(body_timeout=1.0, keepalive_timeout=60.0)
    head = b"POST /o/gen/10 HTTP/1.1\r\nHost: r\r\nContent-Length: 16000\r\n\r\n"
    response, closed = _trickle(relay.port, head)
    assert status_of(response) == 405
    assert len(STATUS_LINE.findall(response)) == 1
    assert closed  # by body_timeout, although bytes kept coming


def test_declared_body_over_max_body_bytes_gets_413_at_once(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    relay = make_relay(data_dir=str(tmp_path), max_body_bytes=1024)
    head = (
        b"POST /downloads HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Content-Length: 2000\r\n\r\n"
    )
    response = raw_http(relay.port, head)
    assert status_of(response) == 413


def test_chunked_body_over_max_body_bytes_gets_413(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    relay = make_relay(data_dir=str(tmp_path), max_body_bytes=1024)
    chunk = b"x" * 600
    head = (
        b"POST /downloads HTTP/1.1\r\nHost: r\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + (b"258\r\n" + chunk + b"\r\n") * 2
    )
    response = raw_http(relay.port, head)
    assert status_of(response) == 413
    assert len(STATUS_LINE.findall(response)) == 1


# -- finding 5: slow readers -----------------------------------------------------------------


@contextlib.contextmanager
def held(url: str, headers: dict[str, str]) -> Iterator[int]:
    """A download held open (the upstream stalls) until the block ends; yields its status."""
    started, stop = threading.Event(), threading.Event()
    status: list[int] = []

    def hold() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", url, headers=headers) as response,
        ):
            status.append(response.status_code)
            started.set()
            stop.wait(20)

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield status[0]
    finally:
        stop.set()
        thread.join(10)


def test_streams_per_client_address_are_limited_with_429(
    make_relay: Callable[..., RelayThread],
) -> None:
    """The client is the address the forwarded policy resolves: behind a trusted proxy, each
    X-Forwarded-For client has its own allowance."""
    relay = make_relay(trusted_proxies="127.0.0.1", max_streams_per_client=2)
    url = f"{relay.url}/o/gen/10m?stall_after=1000"
    first = {"X-Forwarded-For": "6.6.6.6"}
    with held(url, first) as one, held(url, first) as two:
        assert one == two == 200
        refused = httpx.get(f"{relay.url}/o/gen/10", headers=first)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        other = httpx.get(f"{relay.url}/o/gen/10", headers={"X-Forwarded-For": "7.7.7.7"})
        assert other.status_code == 200
        assert active_streams(relay) == 2
    assert wait_until(lambda: active_streams(relay) == 0)
    assert relay.settled()
    assert httpx.get(f"{relay.url}/o/gen/10", headers=first).status_code == 200
    limiter = limiter_of(relay)
    assert relay.call(lambda: dict(limiter.by_client)) == {}


def test_client_reading_below_min_send_rate_is_reset(
    make_relay: Callable[..., RelayThread], caplog: pytest.LogCaptureFixture
) -> None:
    """A client reading at about 40 KB/s against a 256 KB/s minimum is cut after the grace
    window: its connection reset, the cut logged, its upstream connection released."""
    caplog.set_level(logging.INFO, logger="relay.access")
    relay = make_relay(min_send_rate=256_000, min_rate_window=0.5)
    received, ending = read_slowly(relay.port, "/o/gen/256m")
    assert ending == "reset", (ending, received)
    assert received < 256 * 1024 * 1024
    assert relay.settled()
    assert any("fewer than 256000 bytes/s" in r.getMessage() for r in caplog.records)
    assert wait_until(
        lambda: any(
            r.name == "relay.access" and "client_slow" in r.getMessage() for r in caplog.records
        )
    )
    assert active_streams(relay) == 0


@pytest.mark.skipif(CURL is None, reason="needs curl")
def test_fast_client_and_slow_upstream_are_not_cut_by_min_send_rate(
    make_relay: Callable[..., RelayThread],
) -> None:
    """The rate judges the client only: a client that keeps up with a slow upstream (100 KB/s,
    under the minimum) gets the whole body."""
    relay = make_relay(min_send_rate=256_000, min_rate_window=0.5)
    code, digest, size = curl(f"{relay.url}/o/gen/200000?slow=100000")
    assert (code, size) == (0, 200000)
    assert digest == expected_sha256(200000)
    code, digest, size = curl(f"{relay.url}/o/gen/64m")
    assert (code, digest) == (0, expected_sha256(64 * 1024 * 1024))


# -- finding 7: Unicode traversal spellings --------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/o/%c0%ae%c0%ae/admin",  # overlong UTF-8 '..'
        "/o/%c0%af",  # overlong UTF-8 '/'
        "/o/a%e9b",  # latin-1, not UTF-8
        "/o/%ef%bc%8e%ef%bc%8e/admin",  # fullwidth full stop
        "/o/%e2%80%a4%e2%80%a4/admin",  # one-dot leader
        "/o/%e2%80%a5/admin",  # two-dot leader
        "/o/%ef%b9%92%ef%b9%92/admin",  # small full stop
        "/o/..%ef%bc%8fadmin",  # fullwidth solidus
        "/o/..%e2%88%95admin",  # division slash
        "/o/..%e2%81%84admin",  # fraction slash
        "/o/..%ef%bc%bcadmin",  # fullwidth reverse solidus
    ],
)
def test_unicode_and_overlong_traversal_spellings_get_400(
    make_relay: Callable[..., RelayThread], origin: Origin, path: str
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    response = httpx.get(f"{relay.url}{path}?m={marker}")
    assert response.status_code == 400
    assert not seen(origin, marker)


def test_non_ascii_utf8_path_is_still_relayed(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    response = httpx.get(f"{relay.url}/o/caf%C3%A9.txt?m={marker}")
    assert response.status_code == 404  # the origin's answer: the request went through
    assert seen(origin, marker) == [f"/caf%C3%A9.txt?m={marker}"]


# -- finding 8: request framing --------------------------------------------------------------

FRAMING = {
    "http/1.0 chunked": (
        b"GET /o/gen/10?m={m} HTTP/1.0\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "two hosts": b"GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nHost: evil\r\n\r\n",
    "no host": b"GET /o/gen/10?m={m} HTTP/1.1\r\nUser-Agent: x\r\n\r\n",
    "post http/1.0 chunked": (
        b"POST /o/gen/10?m={m} HTTP/1.0\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("name", sorted(FRAMING))
def test_ambiguous_request_framing_gets_400_and_one_response(
    make_relay: Callable[..., RelayThread], origin: Origin, name: str
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    follow = f"GET /o/gen/20?m={marker}2 HTTP/1.1\r\nHost: r\r\n\r\n".encode()
    response = raw_http(relay.port, FRAMING[name].replace(b"{m}", marker.encode()) + follow)
    assert status_of(response) == 400, response[:200]
    assert len(STATUS_LINE.findall(response)) == 1
    assert not seen(origin, marker)


def test_http_1_0_without_host_is_served(make_relay: Callable[..., RelayThread]) -> None:
    relay = make_relay()
    response = raw_http(relay.port, b"GET /o/gen/10 HTTP/1.0\r\n\r\n")
    assert status_of(response) == 200
    assert len(body_of(response)) == 10
