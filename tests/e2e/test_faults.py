"""End to end over loopback: upstream faults, client aborts, and nothing left behind."""

from __future__ import annotations

import contextlib
import resource
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest

from relay.config import Route
from tests.harness import RelayThread, abort_download, raw_http, status_of, wait_until
from tests.origin import Origin

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused_gives_502(make_relay: Callable[..., RelayThread]) -> None:
    port = closed_port()
    relay = make_relay(
        routes=(Route(prefix="/o/", upstream=f"http://127.0.0.1:{port}/", allow_private=True),)
    )
    response = httpx.get(f"{relay.url}/o/x")
    assert response.status_code == 502
    assert response.headers["content-type"].startswith("text/plain")
    assert "cannot connect" in response.text
    assert "Traceback" not in response.text
    assert relay.settled()


def test_reset_before_headers_gives_502(relay: RelayThread) -> None:
    response = httpx.get(f"{relay.url}/o/gen/1000?reset_headers=1")
    assert response.status_code == 502
    assert relay.settled()


def test_no_answer_gives_504(make_relay: Callable[..., RelayThread]) -> None:
    relay = make_relay(read_timeout=0.5)
    response = httpx.get(f"{relay.url}/o/gen/1000?stall_headers=1", timeout=10)
    assert response.status_code == 504
    assert "timed out" in response.text
    assert relay.settled()


@pytest.mark.parametrize("framing", ["cl_te", "dup_cl"])
def test_conflicting_upstream_framing_gives_502(
    make_relay: Callable[..., RelayThread], framing: str
) -> None:
    relay = make_relay()
    response = httpx.get(f"{relay.url}/o/gen/1000?bad_framing={framing}")
    assert response.status_code == 502
    assert relay.settled()


def _hold_stream(url: str, started: threading.Event, stop: threading.Event) -> None:
    with httpx.Client(timeout=30) as client, client.stream("GET", url) as response:
        started.set()
        stop.wait(20)
        response.close()


@contextlib.contextmanager
def held_stream(url: str) -> Iterator[None]:
    """A download that holds its upstream connection (upstream stalls) until released."""
    started, stop = threading.Event(), threading.Event()
    thread = threading.Thread(target=_hold_stream, args=(url, started, stop), daemon=True)
    thread.start()
    assert started.wait(10)
    try:
        yield
    finally:
        stop.set()
        thread.join(10)


def test_pool_exhausted_gives_503_with_retry_after(make_relay: Callable[..., RelayThread]) -> None:
    relay = make_relay(max_connections=1, pool_timeout=0.3)
    with held_stream(f"{relay.url}/o/gen/10m?stall_after=1000"):
        response = httpx.get(f"{relay.url}/o/gen/10", timeout=10)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
    assert relay.settled()
    assert httpx.get(f"{relay.url}/o/gen/10").status_code == 200


@pytest.mark.parametrize(
    "fault",
    [
        "close_after=40000",  # Content-Length promised, connection closed early
        "reset_after=40000",  # connection reset mid-body
        "chunked_die=40000",  # chunked, no terminating chunk
        "lie_length=200000",  # declares more than it sends
    ],
)
@pytest.mark.parametrize("resume", ["off", "impossible"])
def test_upstream_dying_mid_body_aborts_the_client(
    make_relay: Callable[..., RelayThread], fault: str, resume: str
) -> None:
    """Every byte received is forwarded, then the client transfer is aborted, never cleanly.

    With resume off, or when the object changed (a new ETag each time, so If-Range fails).
    """
    relay = make_relay(resume_attempts=0 if resume == "off" else 3)
    if resume == "impossible":
        fault += "&etag_changes=1"
    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{relay.url}/o/gen/100000?{fault}") as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
    if fault.startswith(("close_after", "chunked_die")):
        assert len(received) == 40000
    assert relay.settled()


def test_bad_chunk_framing_is_never_a_clean_response(relay: RelayThread) -> None:
    """Malformed chunk framing: 502 if caught before the response started, else an abort."""
    try:
        with (
            httpx.Client(timeout=10) as client,
            client.stream("GET", f"{relay.url}/o/gen/100000?bad_framing=bad_chunk") as response,
        ):
            for _ in response.iter_raw():
                pass
    except httpx.RemoteProtocolError:
        pass
    else:
        assert response.status_code == 502
    assert relay.settled()


def test_upstream_stall_mid_body_aborts_after_read_timeout(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(read_timeout=0.5, resume_attempts=0)
    marker = uuid.uuid4().hex
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{relay.url}/o/gen/1m?stall_after=5000&m={marker}") as response,
    ):
        for _ in response.iter_raw():
            pass
    assert relay.settled()
    # The stalled upstream connection is discarded, not pooled.
    assert relay.pool_stats().idle == 0


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_aborted_downloads_leave_no_connection_checked_out(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    """200 clients that drop mid-body against a pool of 10: the pool returns to zero in use."""
    relay = make_relay(max_connections=10, pool_timeout=10)
    baseline_upstream = origin.open_connections
    rss_before = _rss_kib()
    assert rss_before > 0, "the RSS probe measured nothing"
    threads = []
    for i in range(200):
        t = threading.Thread(
            target=abort_download, args=(relay.port, f"/o/gen/64m?i={i}", 64 * 1024), daemon=True
        )
        t.start()
        threads.append(t)
        if len(threads) >= 20:
            threads.pop(0).join(30)
    for t in threads:
        t.join(30)
    assert relay.settled(), f"pool still has connections in use: {relay.pool_stats()}"
    assert wait_until(
        lambda: origin.open_connections <= baseline_upstream + relay.pool_stats().idle
    )
    response = httpx.get(f"{relay.url}/o/gen/1000")
    assert response.status_code == 200
    assert len(response.content) == 1000
    # Generous bound (the test process also hosts the origin and 20 client threads): nothing
    # per aborted download is kept. bench/aborts.py measures the relay process alone.
    assert _rss_kib() - rss_before < 64 * 1024


def test_client_disconnect_while_waiting_for_headers_cancels_upstream(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(read_timeout=30)
    baseline = origin.open_connections
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"GET /o/gen/1000?stall_headers=1 HTTP/1.1\r\nHost: relay\r\n\r\n")
        assert wait_until(lambda: relay.pool_stats().in_use == 1)
    # The relay notices the disconnect and closes its upstream attempt long before read_timeout.
    assert relay.settled(timeout=10)
    assert wait_until(lambda: origin.open_connections <= baseline, timeout=10)


def test_client_disconnect_while_waiting_for_pool_slot_never_reaches_upstream(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(max_connections=1, pool_timeout=30)
    marker = uuid.uuid4().hex
    with held_stream(f"{relay.url}/o/gen/10m?stall_after=1000"):
        with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
            sock.sendall(f"GET /o/gen/10?m={marker} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
            # Queued for the one connection (the transport counts it), not merely slow to start.
            assert wait_until(lambda: relay.requests_waiting() == 1)
        # The client left: relay stops waiting for it while the connection is still held.
        assert wait_until(lambda: relay.requests_waiting() == 0)
        assert relay.pool_stats().in_use == 1
    assert relay.settled()
    # The freed connection goes to the next request, never to the abandoned one.
    assert httpx.get(f"{relay.url}/o/gen/10").status_code == 200
    assert not [r for r in origin.requests if marker in r.target]


def test_error_bodies_are_short_and_plain(make_relay: Callable[..., RelayThread]) -> None:
    port = closed_port()
    relay = make_relay(
        routes=(Route(prefix="/o/", upstream=f"http://127.0.0.1:{port}/", allow_private=True),)
    )
    response = raw_http(relay.port, b"GET /o/x HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n")
    assert status_of(response) == 502
    head, _, body = response.partition(b"\r\n\r\n")
    assert 0 < len(body) < 300
    assert b"text/plain" in head


@pytest.mark.parametrize("cut", [1_000_000, 33_333_333])
def test_every_byte_received_is_forwarded_before_the_abort(
    make_relay: Callable[..., RelayThread], cut: int
) -> None:
    """Bytes the transport had buffered when the upstream died still reach the client."""
    relay = make_relay(resume_attempts=0)
    received = 0
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{relay.url}/o/gen/64m?close_after={cut}") as response,
    ):
        for chunk in response.iter_raw():
            time.sleep(0.002)  # a slow client: relay often holds buffered upstream bytes
            received += len(chunk)
    assert received == cut
