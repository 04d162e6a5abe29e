"""End to end over loopback: relay is never an open proxy, never smuggled, never stalled."""

from __future__ import annotations

import logging
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable

import httpx
import pytest

from relay.config import Route
from relay.net.transports.aiohttp_transport import AiohttpTransport
from relay.server.auth import sign
from tests.e2e.test_faults import held_stream
from tests.harness import RelayThread, raw_http, status_of, wait_until
from tests.origin import Origin

pytestmark = pytest.mark.e2e


def seen(origin: Origin, marker: str) -> list[str]:
    return [r.target for r in origin.requests if marker in r.target]


def route(origin: Origin, **options: object) -> tuple[Route, ...]:
    return (Route(prefix="/o/", upstream=origin.url + "/", **options),)  # type: ignore[arg-type]


# -- egress --------------------------------------------------------------------------------


def test_name_resolving_to_loopback_is_refused_without_opt_in(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    """Default routes reach only public addresses: localhost is refused, nothing is sent."""
    relay = make_relay(
        routes=(Route(prefix="/o/", upstream=f"http://localhost:{origin.port}/"),),
    )
    marker = uuid.uuid4().hex
    response = httpx.get(f"{relay.url}/o/gen/10?m={marker}")
    assert response.status_code == 502
    assert "egress policy" in response.text
    assert not seen(origin, marker)
    assert relay.settled()


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/",
        "http://[::ffff:127.0.0.1]:1/",
        "http://[::1]:1/",
        "http://10.0.0.1/",
    ],
)
async def test_transport_refuses_private_literals_before_connecting(url: str) -> None:
    async with AiohttpTransport() as transport:
        with pytest.raises(httpx.ConnectError, match="egress policy"):
            await transport.handle_async_request(httpx.Request("GET", url))


# -- redirects -----------------------------------------------------------------------------


def test_passed_redirect_into_the_upstream_is_rewritten_to_relay(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay()
    to = urllib.parse.quote(f"{origin.url}/gen/10", safe="")
    response = httpx.get(f"{relay.url}/o/redirect?to={to}")
    assert response.status_code == 302
    assert response.headers["location"] == "/o/gen/10"


def test_followed_redirect_to_an_allowed_host_is_served(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(
        routes=route(origin, allow_private=True, redirects="follow", redirect_hosts=("localhost",))
    )
    to = urllib.parse.quote(f"http://localhost:{origin.port}/gen/1000?hop=1", safe="")
    response = httpx.get(f"{relay.url}/o/redirect?to={to}")
    assert response.status_code == 200
    assert len(response.content) == 1000
    assert relay.settled()


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://evil.example/x",
        "ftp://localhost/x",
        "http://127.1:1/x",
    ],
)
def test_redirect_outside_the_allow_list_is_not_followed(
    make_relay: Callable[..., RelayThread], origin: Origin, target: str
) -> None:
    relay = make_relay(
        routes=route(origin, allow_private=True, redirects="follow", redirect_hosts=("localhost",))
    )
    to = urllib.parse.quote(target, safe="")
    response = httpx.get(f"{relay.url}/o/redirect?to={to}")
    assert response.status_code == 502
    assert "redirect not followed" in response.text
    assert relay.settled()


def test_redirect_loop_stops_at_the_hop_limit(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(
        routes=route(
            origin,
            allow_private=True,
            redirects="follow",
            redirect_hosts=("127.0.0.1",),
            max_redirects=2,
        )
    )
    loop = f"{origin.url}/redirect?to=" + urllib.parse.quote(f"{origin.url}/redirect?to=x")
    response = httpx.get(f"{relay.url}/o/redirect", params={"to": loop})
    assert response.status_code == 502
    assert relay.settled()


# -- credentials ---------------------------------------------------------------------------


def test_route_credential_is_injected_and_never_logged(
    make_relay: Callable[..., RelayThread],
    origin: Origin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    relay = make_relay(
        routes=route(origin, allow_private=True, credential="Bearer s3cret-token"),
        log_level="debug",
    )
    marker = uuid.uuid4().hex
    with caplog.at_level(logging.DEBUG):
        response = httpx.get(
            f"{relay.url}/o/gen/10?m={marker}",
            headers={"Authorization": "Bearer client", "Cookie": "a=1"},
        )
    assert response.status_code == 200
    record = next(r for r in origin.requests if marker in r.target)
    assert record.header_all("authorization") == ["Bearer s3cret-token"]
    assert not record.has_header("cookie")
    assert "s3cret" not in caplog.text
    assert "s3cret" not in repr(relay.config)
    assert "s3cret" not in str(relay.config.describe())


def test_route_credential_is_not_sent_to_a_redirect_host(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(
        routes=route(
            origin,
            allow_private=True,
            credential="Bearer s3cret-token",
            redirects="follow",
            redirect_hosts=("localhost",),
        )
    )
    marker = uuid.uuid4().hex
    to = urllib.parse.quote(f"http://localhost:{origin.port}/gen/10?m={marker}", safe="")
    assert httpx.get(f"{relay.url}/o/redirect?to={to}").status_code == 200
    record = next(r for r in origin.requests if r.target == f"/gen/10?m={marker}")
    assert not record.has_header("authorization")


def test_client_credentials_forwarded_only_when_the_route_says_so(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(routes=route(origin, allow_private=True, forward_client_auth=True))
    marker = uuid.uuid4().hex
    httpx.get(
        f"{relay.url}/o/gen/10?m={marker}",
        headers={"Authorization": "Basic dTpw", "Cookie": "a=1"},
    )
    record = next(r for r in origin.requests if marker in r.target)
    assert record.header("authorization") == "Basic dTpw"
    assert record.header("cookie") == "a=1"


# -- client authentication -----------------------------------------------------------------


def test_shared_secret_is_required_and_checked(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(client_secret="cdn-secret")
    marker = uuid.uuid4().hex
    url = f"{relay.url}/o/gen/10?m={marker}"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers={"X-Relay-Secret": "nope"}).status_code == 403
    assert not seen(origin, marker)
    assert httpx.get(url, headers={"X-Relay-Secret": "cdn-secret"}).status_code == 200
    assert httpx.get(f"{relay.url}/healthz").status_code == 200
    assert httpx.get(f"{relay.url}/readyz").status_code == 200


def test_signed_urls_are_checked_and_stripped(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(signing_key="k3y")
    marker = uuid.uuid4().hex
    path = "/o/gen/10"
    future = int(time.time()) + 600
    good = f"{relay.url}{path}?m={marker}&{sign('k3y', path, future, query=f'm={marker}')}"
    response = httpx.get(good)
    assert response.status_code == 200
    assert seen(origin, marker) == [f"/gen/10?m={marker}"]
    past = int(time.time()) - 1
    expired = f"{relay.url}{path}?m={marker}x&{sign('k3y', path, past, query=f'm={marker}x')}"
    assert httpx.get(expired).status_code == 403
    other_path = (
        f"{relay.url}/o/gen/20?m={marker}y&{sign('k3y', path, future, query=f'm={marker}y')}"
    )
    assert httpx.get(other_path).status_code == 403
    assert httpx.get(f"{relay.url}{path}?m={marker}z").status_code == 401
    assert len(seen(origin, marker)) == 1


# -- trusted proxies -----------------------------------------------------------------------


def test_forwarded_headers_are_believed_only_from_trusted_proxies(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    claims = {"X-Forwarded-For": "6.6.6.6", "X-Forwarded-Proto": "https"}
    untrusted = make_relay(trusted_proxies="10.0.0.0/8")
    marker = uuid.uuid4().hex
    httpx.get(f"{untrusted.url}/o/gen/10?m={marker}", headers=claims)
    record = next(r for r in origin.requests if marker in r.target)
    assert record.header("x-forwarded-for") == "127.0.0.1"
    assert record.header("x-forwarded-proto") == "http"
    trusted = make_relay(trusted_proxies="127.0.0.1/32, ::1")
    marker = uuid.uuid4().hex
    httpx.get(f"{trusted.url}/o/gen/10?m={marker}", headers=claims)
    record = next(r for r in origin.requests if marker in r.target)
    assert record.header("x-forwarded-for") == "6.6.6.6, 127.0.0.1"
    assert record.header("x-forwarded-proto") == "https"


# -- HTTP parsing --------------------------------------------------------------------------

SMUGGLING = {
    "duplicate content-length": (
        "GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nContent-Length: 5\r\n"
        "Content-Length: 7\r\n\r\nhello12"
    ),
    "te and cl": (
        "GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nContent-Length: 4\r\n"
        "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad chunk size": (
        "GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: chunked\r\n\r\n"
        "zz\r\nhello\r\n0\r\n\r\n"
    ),
    "te obfuscated": (
        "GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nTransfer-Encoding: xchunked\r\n"
        "Content-Length: 3\r\n\r\nabc"
    ),
    "te on http/1.0": (
        "GET /o/gen/10?m={m} HTTP/1.0\r\nHost: r\r\nTransfer-Encoding: chunked\r\n"
        "Content-Length: 3\r\n\r\n0\r\n\r\n"
    ),
    "space before colon": (
        "GET /o/gen/10?m={m} HTTP/1.1\r\nHost: r\r\nContent-Length : 3\r\n\r\nabc"
    ),
}


@pytest.mark.parametrize("name", sorted(SMUGGLING))
def test_smuggling_attempts_get_400_and_one_response(
    make_relay: Callable[..., RelayThread], origin: Origin, name: str
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    payload = (
        SMUGGLING[name].format(m=marker) + f"GET /o/gen/20?m={marker}2 HTTP/1.1\r\nHost: r\r\n\r\n"
    )
    response = raw_http(relay.port, payload.encode())
    assert status_of(response) == 400, response[:200]
    assert response.count(b"HTTP/1.") == 1
    assert not seen(origin, marker)


@pytest.mark.parametrize(
    "headers",
    [
        "X-Big: " + "a" * 20 * 1024 + "\r\n",
        "X-Big: " + "a" * 200 * 1024 + "\r\n",
        "".join(f"X-{i}: v\r\n" for i in range(10_000)),
    ],
    ids=["20KiB", "200KiB", "10000-fields"],
)
def test_oversized_request_heads_get_431(
    make_relay: Callable[..., RelayThread], origin: Origin, headers: str
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    request = f"GET /o/gen/10?m={marker} HTTP/1.1\r\nHost: r\r\n{headers}\r\n"
    response = raw_http(relay.port, request.encode())
    assert status_of(response) == 431
    assert not seen(origin, marker)


def test_slowloris_is_closed_after_the_header_timeout(
    make_relay: Callable[..., RelayThread],
) -> None:
    relay = make_relay(header_timeout=1.0)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"GET /o/gen/10 HTTP/1.1\r\nHo")
        received = b""
        closed = False
        for _ in range(40):  # bounded: one byte every 0.25 s for at most 10 s
            try:
                sock.sendall(b"s")
            except OSError:
                closed = True
                break
            sock.settimeout(0.25)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except ConnectionResetError:
                # Closed with a byte of ours unread: the kernel answers with a reset, not a
                # FIN (the 408 sent before it was read in an earlier turn).
                closed = True
                break
            if not chunk:
                closed = True
                break
            received += chunk
    assert status_of(received) == 408
    assert closed


def test_client_that_stops_reading_is_cut_and_upstream_released(
    make_relay: Callable[..., RelayThread],
) -> None:
    relay = make_relay(send_timeout=1.0)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        sock.sendall(b"GET /o/gen/256m HTTP/1.1\r\nHost: r\r\n\r\n")
        sock.recv(65536)
        # The client now holds its socket without reading; relay must give up on it.
        assert wait_until(lambda: relay.pool_stats().in_use == 1, timeout=5)
        assert relay.settled(timeout=15)
    assert relay.pool_stats().in_use == 0


def test_over_max_streams_is_refused_at_once_without_hurting_streams_in_flight(
    make_relay: Callable[..., RelayThread],
) -> None:
    relay = make_relay(max_streams=2, max_connections=10)
    with (
        held_stream(f"{relay.url}/o/gen/10m?stall_after=1000"),
        held_stream(f"{relay.url}/o/gen/10m?stall_after=1000"),
    ):
        response = httpx.get(f"{relay.url}/o/gen/10", timeout=5)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert relay.pool_stats().in_use == 2
    assert relay.settled()
    assert httpx.get(f"{relay.url}/o/gen/10").status_code == 200
