"""Tests of the fault-injecting test origin (tests/origin.py) itself."""

from __future__ import annotations

import gzip
import hashlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.origin import (
    BASE,
    GZIP_MAX,
    LAST_MODIFIED,
    Origin,
    P,
    body_bytes,
    expected_sha256,
    gzip_body,
    iter_body,
    parse_size,
)

pytestmark = pytest.mark.e2e

MiB = 1 << 20
REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: list[tuple[str, str]]
    body: bytes  # everything after the head, raw (chunk framing included)
    outcome: str  # "eof" | "reset" | "timeout"

    def header_all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def header(self, name: str) -> str | None:
        values = self.header_all(name)
        return values[0] if values else None


def _read_all(sock: socket.socket) -> tuple[bytes, str]:
    chunks: list[bytes] = []
    while True:
        try:
            data = sock.recv(1 << 20)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        except TimeoutError:
            return b"".join(chunks), "timeout"
        if not data:
            return b"".join(chunks), "eof"
        chunks.append(data)


def _parse(data: bytes, outcome: str) -> Raw:
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return Raw(0, [], data, outcome)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = [(n, v.strip()) for n, _, v in (line.partition(":") for line in lines[1:])]
    return Raw(status, headers, body, outcome)


def raw_send(origin: Origin, data: bytes, timeout: float = 5.0) -> Raw:
    """Send raw bytes on a fresh connection, read until EOF / RST / timeout."""
    with socket.create_connection(("127.0.0.1", origin.port), timeout=timeout) as sock:
        sock.sendall(data)
        received, outcome = _read_all(sock)
    return _parse(received, outcome)


def raw_get(
    origin: Origin,
    target: str,
    headers: tuple[tuple[str, str], ...] = (),
    method: str = "GET",
    timeout: float = 5.0,
) -> Raw:
    lines = [f"{method} {target} HTTP/1.1", "Host: origin", "Connection: close"]
    lines += [f"{n}: {v}" for n, v in headers]
    return raw_send(origin, ("\r\n".join(lines) + "\r\n\r\n").encode(), timeout)


def dechunk(body: bytes) -> tuple[bytes, bool, bytes]:
    """Decode chunked framing -> (payload, saw terminating 0-chunk, leftover bytes)."""
    out = bytearray()
    pos = 0
    while True:
        eol = body.find(b"\r\n", pos)
        if eol < 0:
            return bytes(out), False, body[pos:]
        size = int(body[pos:eol], 16)
        if size == 0:
            return bytes(out), body[eol : eol + 4] == b"\r\n\r\n", body[eol + 4 :]
        if eol + 2 + size + 2 > len(body):
            return bytes(out), False, body[pos:]
        out += body[eol + 2 : eol + 2 + size]
        assert body[eol + 2 + size : eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size


@pytest.fixture(scope="module")
def origin() -> Iterator[Origin]:
    with Origin() as o:
        yield o


@pytest.fixture
def fresh() -> Iterator[Origin]:
    """A private origin for tests that look at connection counts or stalls."""
    with Origin() as o:
        yield o


@pytest.fixture
def client(origin: Origin) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=origin.url, timeout=5.0, trust_env=False) as c:
        yield c


# --------------------------------------------------------------------------------------------
# content helpers
# --------------------------------------------------------------------------------------------


def test_parse_size() -> None:
    assert parse_size("0") == 0
    assert parse_size("1000") == 1000
    assert parse_size("1k") == 1024
    assert parse_size("3M") == 3 * MiB
    assert parse_size("1g") == 1 << 30
    for bad in ("", "-1", "1x", "k", "1.5m"):
        with pytest.raises(ValueError, match="invalid size"):
            parse_size(bad)


def test_body_helpers() -> None:
    assert len(BASE) == P == 1_048_573
    assert body_bytes(10) == BASE[:10]
    assert body_bytes(P + 10, P - 5, P + 5) == BASE[-5:] + BASE[:5]
    size = 3 * MiB + 17
    whole = b"".join(iter_body(size, chunk=100_000))
    assert len(whole) == size
    assert all(whole[i] == BASE[i % P] for i in (0, P - 1, P, 2 * P + 3, size - 1))
    assert body_bytes(size, MiB, MiB + 1000) == whole[MiB : MiB + 1000]
    assert all(len(piece) <= 4096 for piece in iter_body(size, 5, 100_000, chunk=4096))
    assert expected_sha256(size) == hashlib.sha256(whole).hexdigest()
    assert expected_sha256(size, 7, 99_999) == hashlib.sha256(whole[7:99_999]).hexdigest()
    assert body_bytes(5, 5) == b""
    with pytest.raises(ValueError, match="invalid window"):
        iter_body(10, 0, 11)
    with pytest.raises(ValueError, match="invalid window"):
        body_bytes(10, 6, 5)


# --------------------------------------------------------------------------------------------
# content over HTTP
# --------------------------------------------------------------------------------------------


def test_sha256_of_32_mib(client: httpx.Client) -> None:
    size = 32 * MiB
    h = hashlib.sha256()
    with client.stream("GET", "/gen/32m") as resp:
        assert resp.status_code == 200
        assert resp.headers["content-length"] == str(size)
        assert resp.headers["etag"] == f'"gen-{size}-v1"'
        assert resp.headers["last-modified"] == LAST_MODIFIED
        assert resp.headers["accept-ranges"] == "bytes"
        assert resp.headers["content-type"] == "application/octet-stream"
        assert resp.headers["cache-control"] == "public, max-age=3600"
        for piece in resp.iter_raw():
            h.update(piece)
    assert h.hexdigest() == expected_sha256(size)


def test_version_param_and_head(origin: Origin) -> None:
    r = raw_get(origin, "/gen/5000?v=7", method="HEAD")
    assert r.status == 200
    assert r.header("etag") == '"gen-5000-v7"'
    assert r.header("content-length") == "5000"
    assert r.body == b""
    assert r.outcome == "eof"
    # Range is only defined for GET: a HEAD with Range gets the 200 headers
    r = raw_get(origin, "/gen/5000", (("Range", "bytes=0-9"),), method="HEAD")
    assert r.status == 200
    assert r.header("content-length") == "5000"


@pytest.mark.parametrize(
    ("range_value", "size", "start", "stop"),
    [
        ("bytes=0-99", 1000, 0, 100),
        ("bytes=100-", 1000, 100, 1000),
        ("bytes=-100", 1000, 900, 1000),
        ("bytes=990-5000", 1000, 990, 1000),
        ("bytes=-5000", 1000, 0, 1000),
        ("bytes=999-999", 1000, 999, 1000),
        ("Bytes = 1048576-1048675", 3 * MiB, MiB, MiB + 100),
        ("bytes=2097152-2097160", 3 * MiB, 2 * MiB, 2 * MiB + 9),
    ],
)
def test_range_206(
    client: httpx.Client, range_value: str, size: int, start: int, stop: int
) -> None:
    resp = client.get(f"/gen/{size}", headers={"Range": range_value})
    assert resp.status_code == 206
    assert resp.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
    assert resp.headers["content-length"] == str(stop - start)
    assert resp.content == body_bytes(size, start, stop)


@pytest.mark.parametrize("range_value", ["bytes=1000-", "bytes=5000-6000", "bytes=-0"])
def test_range_416(client: httpx.Client, range_value: str) -> None:
    resp = client.get("/gen/1000", headers={"Range": range_value})
    assert resp.status_code == 416
    assert resp.headers["content-range"] == "bytes */1000"
    assert resp.content == b""


def test_range_on_empty_body_is_416(client: httpx.Client) -> None:
    resp = client.get("/gen/0", headers={"Range": "bytes=-5"})
    assert resp.status_code == 416
    assert resp.headers["content-range"] == "bytes */0"


@pytest.mark.parametrize(
    "range_value", ["bytes=0-9,20-29", "bytes=9-5", "items=0-5", "bytes=abc", "bytes=-"]
)
def test_multi_or_invalid_range_serves_200(client: httpx.Client, range_value: str) -> None:
    resp = client.get("/gen/1000", headers={"Range": range_value})
    assert resp.status_code == 200
    assert "content-range" not in resp.headers
    assert resp.content == body_bytes(1000)


@pytest.mark.parametrize(
    ("if_range", "expected"),
    [
        ('"gen-1000-v1"', 206),
        ('"gen-1000-v2"', 200),
        ('W/"gen-1000-v1"', 200),  # If-Range uses the strong comparison
        (LAST_MODIFIED, 206),
        ("Tue, 31 Dec 2024 23:59:59 GMT", 200),
        ("not a date", 200),
    ],
)
def test_if_range(client: httpx.Client, if_range: str, expected: int) -> None:
    resp = client.get("/gen/1000", headers={"Range": "bytes=10-19", "If-Range": if_range})
    assert resp.status_code == expected
    assert resp.content == (body_bytes(1000, 10, 20) if expected == 206 else body_bytes(1000))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"If-None-Match": '"gen-1000-v1"'}, 304),
        ({"If-None-Match": 'W/"gen-1000-v1"'}, 304),
        ({"If-None-Match": '"other", "gen-1000-v1"'}, 304),
        ({"If-None-Match": "*"}, 304),
        ({"If-None-Match": '"gen-1000-v2"'}, 200),
        ({"If-Modified-Since": LAST_MODIFIED}, 304),
        ({"If-Modified-Since": "Thu, 02 Jan 2025 00:00:00 GMT"}, 304),
        ({"If-Modified-Since": "Tue, 31 Dec 2024 23:59:59 GMT"}, 200),
        ({"If-Modified-Since": "garbage"}, 200),
        # If-None-Match takes precedence over If-Modified-Since
        ({"If-None-Match": '"nope"', "If-Modified-Since": LAST_MODIFIED}, 200),
    ],
)
def test_conditional(client: httpx.Client, headers: dict[str, str], expected: int) -> None:
    resp = client.get("/gen/1000", headers={**headers, "Range": "bytes=0-9"})
    if expected == 304:
        assert resp.status_code == 304
        assert resp.headers["etag"] == '"gen-1000-v1"'
        assert resp.headers["last-modified"] == LAST_MODIFIED
        assert resp.headers["cache-control"] == "public, max-age=3600"
        assert resp.content == b""
    else:
        assert resp.status_code == 206  # the Range applies when not 304


def test_gzip_round_trip(client: httpx.Client) -> None:
    size = 300_000
    with client.stream("GET", f"/gen/{size}?gzip=1", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.status_code == 200
        raw = b"".join(r.iter_raw())
        assert r.headers["content-encoding"] == "gzip"
        assert r.headers["vary"] == "Accept-Encoding"
        assert r.headers["etag"] == f'"gen-{size}-v1-gz"'
        assert r.headers["content-length"] == str(len(raw))
    assert raw == gzip_body(size)
    assert gzip.decompress(raw) == body_bytes(size)

    # ranges apply to the encoded bytes; conditionals compare against the -gz tag
    ranged = {"Accept-Encoding": "gzip", "Range": "bytes=10-19"}
    with client.stream("GET", f"/gen/{size}?gzip=1", headers=ranged) as r2:
        assert r2.status_code == 206
        assert r2.headers["content-range"] == f"bytes 10-19/{len(raw)}"
        assert b"".join(r2.iter_raw()) == raw[10:20]
    r3 = client.get(
        f"/gen/{size}?gzip=1",
        headers={"Accept-Encoding": "gzip", "If-None-Match": f'"gen-{size}-v1-gz"'},
    )
    assert r3.status_code == 304


@pytest.mark.parametrize("accept", ["identity", "deflate, gzip;q=0", "br"])
def test_gzip_needs_accept_encoding(client: httpx.Client, accept: str) -> None:
    r = client.get("/gen/1000?gzip=1", headers={"Accept-Encoding": accept})
    assert "content-encoding" not in r.headers
    assert r.headers["vary"] == "Accept-Encoding"
    assert r.headers["etag"] == '"gen-1000-v1"'
    assert r.content == body_bytes(1000)


def test_gzip_not_for_big_bodies(origin: Origin) -> None:
    size = GZIP_MAX + 1
    r = raw_get(origin, f"/gen/{size}?gzip=1", (("Accept-Encoding", "gzip"),), method="HEAD")
    assert r.status == 200
    assert r.header("content-encoding") is None
    assert r.header("content-length") == str(size)


def test_chunked_cl0(origin: Origin, client: httpx.Client) -> None:
    size = 600_000
    r = raw_get(origin, f"/gen/{size}?cl=0")
    assert r.status == 200
    assert r.header("content-length") is None
    assert r.header("transfer-encoding") == "chunked"
    payload, terminated, rest = dechunk(r.body)
    assert terminated
    assert rest == b""
    assert payload == body_bytes(size)
    assert client.get(f"/gen/{size}?cl=0").content == body_bytes(size)


def test_cl0_over_http10_is_close_delimited(origin: Origin) -> None:
    r = raw_send(origin, b"GET /gen/1000?cl=0 HTTP/1.0\r\n\r\n")
    assert r.status == 200
    assert r.header("transfer-encoding") is None
    assert r.header("content-length") is None
    assert r.body == body_bytes(1000)
    assert r.outcome == "eof"


# --------------------------------------------------------------------------------------------
# other endpoints
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [200, 404, 500, 503])
def test_status(client: httpx.Client, code: int) -> None:
    r = client.get(f"/status/{code}")
    assert r.status_code == code
    assert r.content.startswith(str(code).encode())


def test_redirect(client: httpx.Client) -> None:
    r = client.get("/redirect", params={"to": "http://example.test/a?b=1", "code": "307"})
    assert r.status_code == 307
    assert r.headers["location"] == "http://example.test/a?b=1"
    r = client.get("/redirect", params={"to": "/gen/10"})
    assert r.status_code == 302
    assert r.headers["location"] == "/gen/10"


def test_echo(client: httpx.Client) -> None:
    r = client.post("/echo?a=1", headers={"X-Thing": "v1", "x-thing": "v2"}, content=b"hello")
    assert r.status_code == 200
    doc = json.loads(r.content)
    assert doc["method"] == "POST"
    assert doc["target"] == "/echo?a=1"
    assert doc["query"] == [["a", "1"]]
    assert doc["body_length"] == 5
    assert ["X-Thing", "v1"] in doc["headers"]
    assert ["x-thing", "v2"] in doc["headers"]


def test_headers_endpoint(origin: Origin) -> None:
    target = "/headers?set=Connection:x-foo&set=X-Foo:1&set=Set-Cookie:a=1&set=Set-Cookie:b=2"
    r = raw_get(origin, target)
    assert r.status == 200
    assert "x-foo" in r.header_all("connection")
    assert r.header_all("x-foo") == ["1"]
    assert r.header_all("set-cookie") == ["a=1", "b=2"]
    assert r.body == b"ok\n"


def test_unknown_path_and_bad_params(client: httpx.Client) -> None:
    assert client.get("/nope").status_code == 404
    assert client.get("/gen/12q").status_code == 404
    assert client.get("/gen/10?close_after=x").status_code == 400
    assert client.get("/gen/10?bad_framing=what").status_code == 400
    assert client.post("/gen/10").status_code == 405


# --------------------------------------------------------------------------------------------
# faults
# --------------------------------------------------------------------------------------------


def test_close_after(origin: Origin, client: httpx.Client) -> None:
    r = raw_get(origin, "/gen/1m?close_after=12345")
    assert r.status == 200
    assert r.header("content-length") == str(MiB)
    assert r.body == body_bytes(MiB, 0, 12345)
    assert r.outcome == "eof"
    with pytest.raises(httpx.RemoteProtocolError):
        client.get("/gen/1m?close_after=1000")


def test_close_after_on_range(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1m?close_after=10", (("Range", "bytes=100-"),))
    assert r.status == 206
    assert r.header("content-length") == str(MiB - 100)
    assert r.body == body_bytes(MiB, 100, 110)
    assert r.outcome == "eof"


def test_reset_after(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1m?reset_after=50000")
    assert r.outcome == "reset"
    assert r.status == 200
    assert r.header("content-length") == str(MiB)
    # the origin waits for the kernel send queue to drain before the RST, so on Linux the
    # client reads all N bytes and then gets ECONNRESET
    assert r.body == body_bytes(MiB, 0, 50000)


def test_reset_headers(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1m?reset_headers=1")
    assert r.outcome == "reset"
    assert r.body == b""
    assert r.status == 0


def test_stall_after(fresh: Origin) -> None:
    r = raw_get(fresh, "/gen/1m?stall_after=7777", timeout=0.5)
    assert r.outcome == "timeout"
    assert r.header("content-length") == str(MiB)
    assert r.body == body_bytes(MiB, 0, 7777)
    # the client went away: the stalled connection is released
    assert fresh.wait_for(lambda o: o.open_connections == 0)


def test_stall_headers(fresh: Origin) -> None:
    r = raw_get(fresh, "/gen/1m?stall_headers=1", timeout=0.3)
    assert r.outcome == "timeout"
    assert r.body == b""
    with (
        httpx.Client(base_url=fresh.url, timeout=0.3, trust_env=False) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.get("/gen/1m?stall_headers=1")
    assert fresh.wait_for(lambda o: o.open_connections == 0)


def test_stop_is_prompt_with_stalled_connections() -> None:
    origin = Origin().start()
    socks = [socket.create_connection(("127.0.0.1", origin.port), timeout=5) for _ in range(3)]
    try:
        socks[0].sendall(b"GET /gen/1m?stall_headers=1 HTTP/1.1\r\n\r\n")
        socks[1].sendall(b"GET /gen/100m?stall_after=10 HTTP/1.1\r\n\r\n")
        # socks[2]: idle connection, no request at all
        assert origin.wait_for(lambda o: len(o.requests) == 2 and o.open_connections == 3)
        origin.stop()  # raises if the thread does not finish
        for s in socks:
            _, outcome = _read_all(s)
            assert outcome in ("eof", "reset")
    finally:
        for s in socks:
            s.close()
    assert origin.open_connections == 0


def test_chunked_die(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1m?chunked_die=300000")
    assert r.status == 200
    assert r.header("transfer-encoding") == "chunked"
    assert r.header("content-length") is None
    payload, terminated, rest = dechunk(r.body)
    assert not terminated
    assert rest == b""
    assert payload == body_bytes(MiB, 0, 300000)
    assert r.outcome == "eof"


def test_bad_framing_cl_te(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1000?bad_framing=cl_te")
    assert r.header_all("content-length") == ["1000"]
    assert r.header_all("transfer-encoding") == ["chunked"]
    assert dechunk(r.body)[0] == body_bytes(1000)
    assert r.outcome == "eof"


def test_bad_framing_dup_cl(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1000?bad_framing=dup_cl")
    assert r.header_all("content-length") == ["1000", "1001"]
    assert r.body == body_bytes(1000)
    assert r.outcome == "eof"


def test_bad_framing_bad_chunk(origin: Origin) -> None:
    r = raw_get(origin, "/gen/1000?bad_framing=bad_chunk")
    assert r.header("transfer-encoding") == "chunked"
    size_line = r.body.split(b"\r\n", 1)[0]
    with pytest.raises(ValueError, match="invalid literal"):
        int(size_line, 16)
    assert r.outcome == "eof"


@pytest.mark.parametrize("lie", [500, 2000])
def test_lie_length(origin: Origin, lie: int) -> None:
    r = raw_get(origin, f"/gen/1000?lie_length={lie}")
    assert r.header("content-length") == str(lie)
    assert r.body == body_bytes(1000)
    assert r.outcome == "eof"


def test_delay_and_slow(client: httpx.Client) -> None:
    r = client.get("/gen/100000?delay=0.05&slow=400k")
    assert r.status_code == 200
    assert r.content == body_bytes(100_000)


def test_drop_once(origin: Origin, client: httpx.Client) -> None:
    origin.reset_stats()
    url = "/gen/200k?drop_once=1000&key=test-drop-once"
    with pytest.raises(httpx.RemoteProtocolError):
        client.get(url)
    for _ in range(2):
        assert client.get(url).content == body_bytes(200 * 1024)
    # per key: another v= or key= is a different object; a ranged request is cut too
    r = raw_get(origin, url + "&v=2", (("Range", "bytes=5-"),))
    assert r.status == 206
    assert r.body == body_bytes(200 * 1024, 5, 1005)
    assert client.get(url + "&v=2").status_code == 200
    # reset_stats() forgets
    origin.reset_stats()
    r = raw_get(origin, url)
    assert r.body == body_bytes(200 * 1024, 0, 1000)
    assert r.outcome == "eof"


def test_etag_changes(client: httpx.Client) -> None:
    first = client.get("/gen/1000?etag_changes=1")
    second = client.get("/gen/1000?etag_changes=1")
    assert first.headers["etag"] != second.headers["etag"]
    assert first.headers["etag"].startswith('"gen-1000-v')
    r = client.get(
        "/gen/1000?etag_changes=1",
        headers={"Range": "bytes=0-9", "If-Range": second.headers["etag"]},
    )
    assert r.status_code == 200
    r = client.get(
        "/gen/1000?etag_changes=1",
        headers={"Range": "bytes=0-9", "If-Range": second.headers["last-modified"]},
    )
    assert r.status_code == 200
    assert r.content == body_bytes(1000)
    r = client.get(
        "/gen/1000?etag_changes=1",
        headers={"If-Modified-Since": second.headers["last-modified"]},
    )
    assert r.status_code == 200


def test_ignore_if_range_serves_the_new_version_as_a_206(client: httpx.Client) -> None:
    """An upstream ignoring If-Range: a changed object's bytes come as a 206 of the new ETag."""
    first = client.get("/gen/1000?etag_changes=1&ignore_if_range=1")
    r = client.get(
        "/gen/1000?etag_changes=1&ignore_if_range=1",
        headers={"Range": "bytes=10-", "If-Range": first.headers["etag"]},
    )
    assert r.status_code == 206
    assert r.headers["content-range"] == "bytes 10-999/1000"
    assert r.headers["etag"] != first.headers["etag"]
    assert r.content == body_bytes(1000, 10)


def test_bare_206_has_no_validators(client: httpx.Client) -> None:
    r = client.get("/gen/1000?bare_206=1", headers={"Range": "bytes=10-"})
    assert r.status_code == 206
    assert "etag" not in r.headers
    assert "last-modified" not in r.headers
    assert r.content == body_bytes(1000, 10)
    assert "etag" in client.get("/gen/1000?bare_206=1").headers


def test_stall_resume_once(origin: Origin, client: httpx.Client) -> None:
    """The first ranged request (per key) stalls before its headers; later ones are served."""
    url = "/gen/1000?stall_resume_once=1&key=test-stall-resume"
    assert client.get(url).status_code == 200
    with pytest.raises(httpx.ReadTimeout):
        client.get(url, headers={"Range": "bytes=10-"}, timeout=0.3)
    r = client.get(url, headers={"Range": "bytes=10-"})
    assert r.status_code == 206
    assert r.content == body_bytes(1000, 10)


# --------------------------------------------------------------------------------------------
# connections and request parsing
# --------------------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(fresh: Origin) -> None:
    with httpx.Client(base_url=fresh.url, timeout=5.0, trust_env=False) as c:
        for path in ("/gen/1000", "/gen/1m", "/status/404"):
            c.get(path)
        assert fresh.total_connections == 1
        assert fresh.open_connections == 1
    ports = {rec.client_port for rec in fresh.requests}
    assert len(ports) == 1
    assert {rec.connection_id for rec in fresh.requests} == {1}
    assert fresh.wait_for(lambda o: o.open_connections == 0)
    fresh.reset_stats()
    assert fresh.total_connections == 0
    assert fresh.requests == []


def test_pipelining_and_connection_close(fresh: Origin) -> None:
    req = b"GET /gen/10 HTTP/1.1\r\nHost: x\r\n\r\n"
    close = b"GET /gen/20 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    r = raw_send(fresh, req + close + req)
    assert r.outcome == "eof"
    first_body, _, rest = r.body.partition(b"HTTP/1.1 200 OK\r\n")
    assert first_body == body_bytes(10)
    second = _parse(b"HTTP/1.1 200 OK\r\n" + rest, "eof")
    assert second.header("connection") == "close"
    assert second.body == body_bytes(20)  # and nothing for the third request
    assert [rec.target for rec in fresh.requests] == ["/gen/10", "/gen/20"]
    assert fresh.total_connections == 1


def test_http10_closes(origin: Origin) -> None:
    r = raw_send(origin, b"GET /gen/100 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert r.status == 200
    assert r.header("connection") == "close"
    assert r.body == body_bytes(100)
    assert r.outcome == "eof"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET /gen/10 HTTP/1.1\r\nBad Header: x\r\n\r\n", 400),
        (b"GET /gen/10 HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", 400),
        (b"GET /gen/10 HTTP/2.0\r\n\r\n", 505),
        (b"GET gen/10 HTTP/1.1\r\n\r\n", 400),
        (b"GET /gen/10 HTTP/1.1\r\nContent-Length: x\r\n\r\n", 400),
        (b"GET /gen/10 HTTP/1.1\r\nX: " + b"a" * 70_000 + b"\r\n\r\n", 431),
    ],
)
def test_junk_is_rejected(origin: Origin, request_bytes: bytes, status: int) -> None:
    r = raw_send(origin, request_bytes)
    assert r.status == status
    assert r.header("connection") == "close"
    assert r.outcome == "eof"


def test_request_body_is_discarded(fresh: Origin) -> None:
    post = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"z" * 100_000
    get = b"GET /gen/10 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    r = raw_send(fresh, post + get)
    assert r.status == 200
    assert r.body.endswith(body_bytes(10))
    assert [rec.body_length for rec in fresh.requests] == [100_000, 0]


def test_request_recording(fresh: Origin) -> None:
    with socket.create_connection(("127.0.0.1", fresh.port), timeout=5) as sock:
        sock.sendall(
            b"GET /gen/10?v=3&x=y HTTP/1.1\r\nHost: h\r\nX-B: 2\r\nx-a: 1\r\nX-A: 3\r\n"
            b"Connection: close\r\n\r\n"
        )
        _read_all(sock)
        client_port = sock.getsockname()[1]
    (rec,) = fresh.requests
    assert rec.method == "GET"
    assert rec.target == "/gen/10?v=3&x=y"
    assert rec.path == "/gen/10"
    assert rec.query == [("v", "3"), ("x", "y")]
    assert rec.http_version == "HTTP/1.1"
    assert rec.headers == [
        ("Host", "h"),
        ("X-B", "2"),
        ("x-a", "1"),
        ("X-A", "3"),
        ("Connection", "close"),
    ]
    assert rec.header("x-a") == "1"
    assert rec.header("X-b") == "2"
    assert rec.header_all("X-A") == ["1", "3"]
    assert rec.header("missing", "dflt") == "dflt"
    assert rec.client_port == client_port


def test_cli_runs_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.origin", "--port", "0"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.strip().rsplit(" ", 1)[-1]
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(timeout=5.0, trust_env=False) as c:
            assert c.get(url + "/gen/1k").content == body_bytes(1024)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_body_bytes_counts_what_gen_sends(origin: Origin) -> None:
    """``Origin.body_bytes`` (the cache benchmark's origin traffic): whole bodies, ranges and a
    body cut off by a fault count what was sent; HEAD and 304 count nothing; reset clears."""
    origin.reset_stats()
    with httpx.Client(base_url=origin.url) as c:
        assert c.get("/gen/1m").content == body_bytes(MiB)
        assert origin.body_bytes == MiB
        assert c.get("/gen/1m", headers={"Range": "bytes=100-199"}).status_code == 206
        assert origin.body_bytes == MiB + 100
        assert c.head("/gen/1m").status_code == 200
        etag = c.get("/gen/10").headers["etag"]
        assert c.get("/gen/10", headers={"If-None-Match": etag}).status_code == 304
        assert origin.body_bytes == MiB + 110
        with pytest.raises(httpx.HTTPError):
            c.get("/gen/1m?close_after=5000")
    assert origin.wait_for(lambda o: o.body_bytes == MiB + 110 + 5000)
    origin.reset_stats()
    assert origin.body_bytes == 0
