"""End to end over loopback: bytes, headers and statuses pass through relay unchanged."""

from __future__ import annotations

import gzip
import hashlib
import uuid
from collections.abc import Callable

import httpx
import pytest

from relay.net.transports.aiohttp_transport import READ_BUFSIZE
from relay.net.transports.reads import SMALL_READ
from tests.harness import (
    RelayThread,
    held_for_a_slow_client,
    raw_http,
    sha256_stream,
    status_of,
)
from tests.origin import Origin, RequestRecord, body_bytes, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def upstream_request(origin: Origin, marker: str) -> RequestRecord:
    matches = [r for r in origin.requests if marker in r.target]
    assert len(matches) == 1, f"expected one upstream request with {marker}, got {len(matches)}"
    return matches[0]


def test_large_body_is_byte_exact(relay: RelayThread) -> None:
    """A 256 MiB body arrives byte for byte (sha256) with the upstream's length."""
    size = 256 * MiB
    with (
        httpx.Client(timeout=60) as client,
        client.stream("GET", f"{relay.url}/o/gen/{size}") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        digest, received = sha256_stream(response)
    assert received == size
    assert digest == expected_sha256(size)
    assert relay.settled()


def test_chunked_upstream_body_is_byte_exact(relay: RelayThread) -> None:
    size = 16 * MiB
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{relay.url}/o/gen/{size}?cl=0") as response,
    ):
        assert response.status_code == 200
        assert "content-length" not in response.headers
        digest, received = sha256_stream(response)
    assert (digest, received) == (expected_sha256(size), size)


def test_response_headers_pass_through(relay: RelayThread) -> None:
    response = httpx.get(f"{relay.url}/o/gen/1000?v=3")
    assert response.status_code == 200
    assert response.content == body_bytes(1000)
    h = response.headers
    assert h["etag"] == '"gen-1000-v3"'
    assert h["last-modified"] == "Wed, 01 Jan 2025 00:00:00 GMT"
    assert h["cache-control"] == "public, max-age=3600"
    assert h["accept-ranges"] == "bytes"
    assert h["content-type"] == "application/octet-stream"
    assert h["content-length"] == "1000"
    assert h["via"] == "1.1 relay"
    assert "transfer-encoding" not in h
    assert "server" not in h


def test_hop_by_hop_and_connection_named_response_headers_are_removed(
    relay: RelayThread,
) -> None:
    response = httpx.get(
        f"{relay.url}/o/headers",
        params=[
            ("set", "Connection: x-private"),
            ("set", "X-Private: secret"),
            ("set", "Keep-Alive: timeout=5"),
            ("set", "Set-Cookie: s=1"),
            ("set", "X-Kept: yes"),
            ("set", "Vary: Accept-Encoding"),
            ("set", "Content-Disposition: attachment; filename=a.bin"),
        ],
    )
    assert response.status_code == 200
    h = response.headers
    assert "x-private" not in h
    assert "keep-alive" not in h
    assert "set-cookie" not in h
    assert h["x-kept"] == "yes"
    assert h["vary"] == "Accept-Encoding"
    assert h["content-disposition"] == "attachment; filename=a.bin"


def test_request_headers_sent_upstream(relay: RelayThread, origin: Origin) -> None:
    marker = uuid.uuid4().hex
    # Raw, so that no Accept-Encoding is sent at all (httpx would add one).
    response = raw_http(
        relay.port,
        f"GET /o/gen/10?m={marker} HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n"
        "User-Agent: curl/8.0\r\nCookie: session=1\r\nAuthorization: Bearer client-token\r\n"
        'X-Forwarded-For: 6.6.6.6\r\nIf-None-Match: "nope"\r\nX-Other: 1\r\n'
        "Connection: close\r\n\r\n".encode(),
    )
    assert status_of(response) == 200
    seen = upstream_request(origin, marker)
    assert seen.header("accept-encoding") == "identity"
    assert seen.header("user-agent") == "curl/8.0"
    assert seen.header("if-none-match") == '"nope"'
    assert not seen.has_header("cookie")
    assert not seen.has_header("authorization")
    assert not seen.has_header("x-other")
    assert seen.header_all("x-forwarded-for") == ["127.0.0.1"]
    assert seen.header("x-forwarded-proto") == "http"
    assert seen.header("x-forwarded-host") == f"127.0.0.1:{relay.port}"
    assert seen.header("via") == "1.1 relay"
    assert seen.header("host") == origin.url.removeprefix("http://")


def test_client_accept_encoding_is_forwarded_as_sent(relay: RelayThread, origin: Origin) -> None:
    marker = uuid.uuid4().hex
    httpx.get(f"{relay.url}/o/gen/10?m={marker}", headers={"Accept-Encoding": "br, gzip;q=0.5"})
    assert upstream_request(origin, marker).header("accept-encoding") == "br, gzip;q=0.5"


def test_headers_named_in_client_connection_are_not_forwarded(
    relay: RelayThread, origin: Origin
) -> None:
    marker = uuid.uuid4().hex
    response = httpx.get(
        f"{relay.url}/o/gen/100?m={marker}",
        headers={"Connection": "keep-alive, Range", "Range": "bytes=0-9"},
    )
    assert response.status_code == 200
    assert len(response.content) == 100
    assert not upstream_request(origin, marker).has_header("range")


def test_gzip_body_passes_through_unchanged(relay: RelayThread) -> None:
    """Upstream gzip arrives compressed, with its own Content-Encoding and Content-Length."""
    with (
        httpx.Client() as client,
        client.stream(
            "GET", f"{relay.url}/o/gen/100000?gzip=1", headers={"Accept-Encoding": "gzip"}
        ) as response,
    ):
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert response.headers["content-length"] == str(len(raw))
    assert response.headers["vary"] == "Accept-Encoding"
    assert gzip.decompress(raw) == body_bytes(100000)


def test_no_accept_encoding_gets_identity(relay: RelayThread) -> None:
    """Without the client asking, relay asks for identity: httpx's gzip default never leaks."""
    with (
        httpx.Client() as client,
        client.stream(
            "GET", f"{relay.url}/o/gen/100000?gzip=1", headers={"Accept-Encoding": ""}
        ) as response,
    ):
        raw = b"".join(response.iter_raw())
    assert "content-encoding" not in response.headers
    assert raw == body_bytes(100000)


@pytest.mark.parametrize(
    ("range_header", "status", "content_range", "start", "end"),
    [
        ("bytes=0-99", 206, "bytes 0-99/5000", 0, 100),
        ("bytes=4900-", 206, "bytes 4900-4999/5000", 4900, 5000),
        ("bytes=-10", 206, "bytes 4990-4999/5000", 4990, 5000),
        ("bytes=6000-", 416, "bytes */5000", 0, 0),
    ],
)
def test_ranges_pass_through(
    relay: RelayThread,
    range_header: str,
    status: int,
    content_range: str,
    start: int,
    end: int,
) -> None:
    response = httpx.get(f"{relay.url}/o/gen/5000", headers={"Range": range_header})
    assert response.status_code == status
    assert response.headers["content-range"] == content_range
    if status == 206:
        assert response.content == body_bytes(5000, start, end)
        assert response.headers["content-length"] == str(end - start)


def test_if_range_mismatch_gets_full_body(relay: RelayThread) -> None:
    response = httpx.get(
        f"{relay.url}/o/gen/5000", headers={"Range": "bytes=0-9", "If-Range": '"other"'}
    )
    assert response.status_code == 200
    assert response.content == body_bytes(5000)


def test_conditional_get_gives_304_without_body(relay: RelayThread) -> None:
    response = httpx.get(f"{relay.url}/o/gen/5000", headers={"If-None-Match": '"gen-5000-v1"'})
    assert response.status_code == 304
    assert response.content == b""
    assert response.headers["etag"] == '"gen-5000-v1"'
    assert "content-length" not in response.headers
    response = httpx.get(
        f"{relay.url}/o/gen/5000",
        headers={"If-Modified-Since": "Thu, 02 Jan 2025 00:00:00 GMT"},
    )
    assert response.status_code == 304


def test_head_has_headers_and_no_body(relay: RelayThread, origin: Origin) -> None:
    marker = uuid.uuid4().hex
    response = httpx.head(f"{relay.url}/o/gen/123456?m={marker}")
    assert response.status_code == 200
    assert response.headers["content-length"] == "123456"
    assert response.headers["etag"] == '"gen-123456-v1"'
    assert response.content == b""
    assert upstream_request(origin, marker).method == "HEAD"
    assert relay.settled()


@pytest.mark.parametrize("code", [404, 410, 500, 503])
def test_upstream_statuses_pass_through(relay: RelayThread, code: int) -> None:
    response = httpx.get(f"{relay.url}/o/status/{code}")
    assert response.status_code == code


def test_upstream_redirect_is_passed_to_the_client(relay: RelayThread) -> None:
    response = httpx.get(f"{relay.url}/o/redirect", params={"to": "https://example.com/x"})
    assert response.status_code == 302
    assert response.headers["location"] == "https://example.com/x"


def test_keepalive_connections_are_reused(relay: RelayThread, origin: Origin) -> None:
    with httpx.Client() as client:
        for _ in range(5):
            assert client.get(f"{relay.url}/o/gen/1000").status_code == 200
    stats = relay.pool_stats()
    assert stats.in_use == 0
    assert stats.idle >= 1


def test_query_string_is_forwarded_raw(relay: RelayThread, origin: Origin) -> None:
    marker = uuid.uuid4().hex
    httpx.get(f"{relay.url}/o/gen/10?m={marker}&sig=a%2Fb%3D&x=1")
    assert upstream_request(origin, marker).target.endswith(f"?m={marker}&sig=a%2Fb%3D&x=1")


def test_sha256_helper_matches_body_bytes() -> None:
    assert hashlib.sha256(body_bytes(5000)).hexdigest() == expected_sha256(5000)


def test_a_slow_client_holds_about_one_small_read_and_one_chunk(
    make_relay: Callable[..., RelayThread],
) -> None:
    """A client slower than the upstream: relay reads 64 KiB at a time for it and waits for it
    to take each chunk, so it holds at most a little over two small reads for it, whatever
    the file size (uvloop alone reads 256 KiB at a time, and aiohttp's default buffer and
    uvicorn's default write limit would each have held more)."""
    relay = make_relay()
    upstream, downstream = held_for_a_slow_client(relay)
    assert upstream > 0, "the probe measured nothing upstream"
    # aiohttp pauses above 2 x 16 KiB and then holds at most one more read; the server
    # pauses as soon as the kernel has not taken a whole chunk.
    assert upstream <= 2 * READ_BUFSIZE + SMALL_READ
    assert 0 < downstream <= SMALL_READ
    assert relay.settled()
