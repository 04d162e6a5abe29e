"""End to end over loopback: what the fuzz tier (tests/fuzz) found in upstream handling.

A raw scripted upstream (tests/scripted_upstream.py) sends exactly the bytes of each case.
"""

from __future__ import annotations

import gc
import socket
import threading
from collections.abc import Iterator

import pytest

from relay.config import Route
from tests.fuzz.wire import GENERIC_5XX_BODY, WireResponse, read_response
from tests.harness import RelayThread, relay_config, running_relay, wait_until
from tests.scripted_upstream import Reply, ScriptedUpstream

pytestmark = pytest.mark.e2e


@pytest.fixture
def upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture
def scripted_relay(upstream: ScriptedUpstream) -> Iterator[RelayThread]:
    config = relay_config(
        upstream.url,
        routes=(Route(prefix="/u/", upstream=upstream.url + "/", allow_private=True),),
        read_timeout=2.0,
        resume_attempts=0,
    )
    with running_relay(config) as relay:
        yield relay


def get(relay: RelayThread, path: str) -> WireResponse:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        return read_response(sock)


def good(upstream: ScriptedUpstream, path: str) -> bytes:
    body = b"good " * 20
    upstream.script(path, Reply([b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + body]))
    return body


@pytest.mark.parametrize("head_first", [False, True])
@pytest.mark.parametrize("end", ["fin", "keep"])
def test_fuzz_finding_complete_response_then_junk_in_the_same_read(
    scripted_relay: RelayThread, upstream: ScriptedUpstream, end: str, head_first: bool
) -> None:
    """A complete response with unrequested bytes right behind it (one read) is relayed
    whole, and its connection is never reused: the junk reaches no other request. With
    `head_first` the head arrives in an earlier read than the end of the body and the junk
    (aiohttp handed the head over before the parser failed: that case always worked)."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\n"
    parts: list[bytes | float] = [head, 0.05, b"abcdjunk"] if head_first else [head + b"abcdjunk"]
    upstream.script("/junk", Reply(parts, end))  # type: ignore[arg-type]
    expected = good(upstream, "/next")
    response = get(scripted_relay, "/u/junk")
    assert (response.status, response.complete, response.body) == (200, True, b"abcd")
    for _ in range(3):
        following = get(scripted_relay, "/u/next")
        assert (following.status, following.complete, following.body) == (200, True, expected)
        assert b"junk" not in following.raw
    first = next(r.connection for r in upstream.received if r.target == b"/junk")
    later = {r.connection for r in upstream.received if r.target == b"/next"}
    assert first not in later
    assert scripted_relay.invariant_violations() == []


def test_fuzz_finding_pooled_connection_reset_after_a_chunked_response_logs_nothing(
    scripted_relay: RelayThread, upstream: ScriptedUpstream
) -> None:
    """A pooled connection reset after a complete response leaves no "Future exception was
    never retrieved" behind (the aiohttp transport watched the connection's `closed`)."""
    head = b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n"
    body = b"7\r\nabcdefg\r\n3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
    # The body comes after the head (so the response watches its connection), the reset
    # once the connection is back in the pool.
    pooled = threading.Event()
    upstream.script("/reset", Reply([head, 0.05, body, pooled], "rst"))
    expected = good(upstream, "/next")
    for _ in range(5):
        pooled.clear()
        response = get(scripted_relay, "/u/reset")
        assert response.status == 206
        assert wait_until(lambda: scripted_relay.pool_stats() == (0, 1))  # idle, pooled
        pooled.set()
        assert wait_until(lambda: upstream.open_connections == 0, timeout=3)
        # The next request finds the reset connection in the pool and drops it.
        following = get(scripted_relay, "/u/next")
        assert (following.status, following.body) == (200, expected)
    scripted_relay.call(gc.collect)
    assert scripted_relay.invariant_violations() == []


def test_fuzz_finding_content_length_with_transfer_encoding_gives_502(
    scripted_relay: RelayThread, upstream: ScriptedUpstream
) -> None:
    """Conflicting framing from the upstream is refused before anything reaches the client,
    whichever parser read it (h11 went by Transfer-Encoding and relayed the Content-Length)."""
    upstream.script(
        "/cl-te",
        Reply(
            [
                b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            ]
        ),
    )
    expected = good(upstream, "/next")
    response = get(scripted_relay, "/u/cl-te")
    assert response.status == 502
    assert b"hello" not in response.body
    following = get(scripted_relay, "/u/next")
    assert (following.status, following.body) == (200, expected)
    assert scripted_relay.invariant_violations() == []


BAD_RESPONSES = {
    "icy": b"ICY 200 OK\r\nContent-Length: 2\r\n\r\nok",
    "status-099": b"HTTP/1.1 099 Low\r\nContent-Length: 2\r\n\r\nok",
    "status-999": b"HTTP/1.1 999 Nine\r\nContent-Length: 2\r\n\r\nok",
    "gzip-chunked": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    ),
    "te-cl": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n",
    "ctl": b"HTTP/1.1 200 OK\r\nX-A: a\x01b\r\nContent-Length: 2\r\n\r\nok",
    "space-cl": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    "bad-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "garbage": b"garbage\r\n\r\n",
}


@pytest.mark.parametrize("kind", sorted(BAD_RESPONSES))
def test_fuzz_finding_502_bodies_quote_neither_parser_nor_upstream(
    scripted_relay: RelayThread, upstream: ScriptedUpstream, kind: str
) -> None:
    """A response relay refuses gets a short 502 of relay's own words: no parser internals
    (`bytearray(...)`, `status_code should...`), no upstream bytes; the log keeps the detail."""
    upstream.script(f"/{kind}", Reply([BAD_RESPONSES[kind]], "fin"))
    response = get(scripted_relay, f"/u/{kind}")
    if kind == "bad-chunk" and response.status == 200:
        assert not response.complete  # the head was fine: the body is aborted instead
    else:
        assert response.status == 502
        assert GENERIC_5XX_BODY.fullmatch(response.body), response.body
        for quoted in (b"ICY", b"bytearray", b"status_code", b"Transfer-Encoding", b"999"):
            assert quoted not in response.body
    assert scripted_relay.invariant_violations() == []


@pytest.mark.parametrize("method", ["GET", "HEAD"])
def test_fuzz_finding_pooled_connection_closed_under_a_request_is_retried_once(
    scripted_relay: RelayThread, upstream: ScriptedUpstream, method: str
) -> None:
    """A kept-alive connection the upstream resets as the next request arrives on it, before
    any byte of a response: the request is sent again, once, on a new connection (RFC 9112
    9.3.1) instead of answering 502."""
    expected = good(upstream, "/first")
    response = get(scripted_relay, "/u/first")
    assert (response.status, response.body) == (200, expected)
    body = b"second " * 10
    upstream.script(
        "/second",
        Reply([], "rst"),
        Reply([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)]),
    )
    with socket.create_connection(("127.0.0.1", scripted_relay.port), timeout=5) as sock:
        sock.sendall(f"{method} /u/second HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        second = read_response(sock, head_request=method == "HEAD")
    assert second.status == 200
    if method == "GET":
        assert (second.complete, second.body) == (True, body)
    sent = [r.connection for r in upstream.received if r.target == b"/second"]
    first = next(r.connection for r in upstream.received if r.target == b"/first")
    assert len(sent) == 2  # sent once more, not twice more
    assert sent[0] == first
    assert sent[1] != first
    assert scripted_relay.invariant_violations() == []


def test_fuzz_finding_request_is_not_sent_again_after_part_of_a_response(
    scripted_relay: RelayThread, upstream: ScriptedUpstream
) -> None:
    """Once any byte of the response arrived, the upstream acted on the request: a reset then
    is a 502, and the request is not sent again."""
    expected = good(upstream, "/first")
    assert get(scripted_relay, "/u/first").body == expected
    upstream.script("/partial", Reply([b"HTTP/1.1 2"], "rst"))
    response = get(scripted_relay, "/u/partial")
    assert response.status == 502
    assert [r.target for r in upstream.received].count(b"/partial") == 1
    assert scripted_relay.invariant_violations() == []
