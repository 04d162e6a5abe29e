"""End to end: GET/HEAD /files/{name}: validators, single ranges, conditionals, names."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest

from relay.http.validators import format_http_date, parse_http_date
from tests.downloads.test_api import marker, post, wait_done
from tests.harness import RelayThread, raw_http, relay_config, status_of
from tests.origin import Origin, body_bytes, expected_sha256

pytestmark = pytest.mark.e2e

SIZE = 300_000
NAME = "served.bin"


@pytest.fixture(scope="module")
def files_relay(origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayThread]:
    """One relay with one published file, shared by the read-only tests below."""
    data_dir = tmp_path_factory.mktemp("files")
    relay = RelayThread(relay_config(origin.url, data_dir=str(data_dir))).start()
    try:
        job = post(relay, path=f"/o/gen/{SIZE}?m={marker()}", name=NAME).json()
        assert wait_done(relay, job["id"])["state"] == "completed"
        yield relay
    finally:
        relay.stop()


def fetch(relay: RelayThread, method: str = "GET", **headers: str) -> httpx.Response:
    return httpx.request(method, f"{relay.url}/files/{NAME}", headers=headers)


def test_files_serves_the_whole_file_with_strong_validators(files_relay: RelayThread) -> None:
    """200 with the exact bytes, a strong sha256 ETag, Last-Modified and Accept-Ranges."""
    response = fetch(files_relay)
    assert response.status_code == 200
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256(SIZE)
    assert response.headers["etag"] == f'"sha256-{expected_sha256(SIZE)}"'
    assert parse_http_date(response.headers["last-modified"]) is not None
    assert response.headers["accept-ranges"] == "bytes"
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["content-type"] == "application/octet-stream"
    assert "content-disposition" not in response.headers
    assert response.headers["x-content-type-options"] == "nosniff"


def test_files_head_sends_headers_only(files_relay: RelayThread) -> None:
    """HEAD: the GET's headers, no body; a Range on HEAD is ignored."""
    response = fetch(files_relay, "HEAD", range="bytes=0-9")
    assert response.status_code == 200
    assert response.content == b""
    assert response.headers["content-length"] == str(SIZE)
    assert response.headers["etag"] == fetch(files_relay).headers["etag"]


@pytest.mark.parametrize(
    ("spec", "start", "stop"),
    [
        ("bytes=10-19", 10, 20),
        ("bytes=0-0", 0, 1),
        (f"bytes={SIZE - 10}-", SIZE - 10, SIZE),
        ("bytes=-100", SIZE - 100, SIZE),
        (f"bytes=100-{SIZE * 2}", 100, SIZE),
        (f"bytes=-{SIZE * 2}", 0, SIZE),
    ],
)
def test_files_single_range_is_206(
    files_relay: RelayThread, spec: str, start: int, stop: int
) -> None:
    """A single satisfiable range: 206, Content-Range, exactly those bytes."""
    response = fetch(files_relay, range=spec)
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{SIZE}"
    assert response.headers["content-length"] == str(stop - start)
    assert response.content == body_bytes(SIZE, start, stop)
    assert response.headers["etag"].startswith('"sha256-')


@pytest.mark.parametrize("spec", [f"bytes={SIZE}-", f"bytes={SIZE + 5}-{SIZE + 9}", "bytes=-0"])
def test_files_unsatisfiable_range_is_416(files_relay: RelayThread, spec: str) -> None:
    """A range past the end: 416 with Content-Range: bytes */size."""
    response = fetch(files_relay, range=spec)
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{SIZE}"


@pytest.mark.parametrize("spec", ["bytes=0-1,5-6", "bytes=abc", "items=0-5", "bytes=9-2"])
def test_files_multiple_or_malformed_ranges_send_the_whole_file(
    files_relay: RelayThread, spec: str
) -> None:
    """Ranges relay does not serve (several, malformed, other units) are ignored: 200."""
    response = fetch(files_relay, range=spec)
    assert response.status_code == 200
    assert len(response.content) == SIZE


def test_files_if_none_match_gives_304(files_relay: RelayThread) -> None:
    """If-None-Match with the ETag (strong, weak or *): 304 with validators, no body."""
    etag = fetch(files_relay, "HEAD").headers["etag"]
    for value in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        response = fetch(files_relay, **{"if-none-match": value})
        assert response.status_code == 304, value
        assert response.content == b""
        assert response.headers["etag"] == etag
    assert fetch(files_relay, **{"if-none-match": '"other"'}).status_code == 200


def test_files_if_modified_since_gives_304_unless_modified(files_relay: RelayThread) -> None:
    """If-Modified-Since at or after Last-Modified: 304; earlier: 200; If-None-Match wins."""
    head = fetch(files_relay, "HEAD").headers
    last_modified = head["last-modified"]
    earlier = format_http_date((parse_http_date(last_modified) or 0) - 3600)
    assert fetch(files_relay, **{"if-modified-since": last_modified}).status_code == 304
    assert fetch(files_relay, **{"if-modified-since": earlier}).status_code == 200
    both = fetch(files_relay, **{"if-modified-since": last_modified, "if-none-match": '"x"'})
    assert both.status_code == 200


def test_files_if_range_honours_the_range_only_while_it_matches(
    files_relay: RelayThread,
) -> None:
    """If-Range with the ETag or the exact date: 206; a different or weak tag: the whole file."""
    head = fetch(files_relay, "HEAD").headers
    for value in (head["etag"], head["last-modified"]):
        assert fetch(files_relay, range="bytes=0-9", **{"if-range": value}).status_code == 206
    for value in ('"sha256-other"', f"W/{head['etag']}", "Mon, 01 Jan 2001 00:00:00 GMT"):
        response = fetch(files_relay, range="bytes=0-9", **{"if-range": value})
        assert response.status_code == 200
        assert len(response.content) == SIZE


def test_files_unknown_name_is_404(files_relay: RelayThread) -> None:
    """A valid name that nothing was published under is 404."""
    response = httpx.get(f"{files_relay.url}/files/nothing-here")
    assert response.status_code == 404
    assert response.json()["error"] == "no such file"


@pytest.mark.parametrize(
    "target",
    [
        b"/files/../jobs.sqlite3",
        b"/files/..%2Fjobs.sqlite3",
        b"/files/%2e%2e%2fjobs.sqlite3",
        b"/files/%2E%2E",
        b"/files/.hidden",
        b"/files/a%2Fb",
        b"/files/sub/served.bin",
        b"/files/served.bin%00",
        b"/files/served%2ebin",
        b"/files/",
    ],
)
def test_files_traversal_in_the_name_is_400(files_relay: RelayThread, target: bytes) -> None:
    """The raw name must be a plain name: any escape, separator or dot-name is refused."""
    reply = raw_http(
        files_relay.port, b"GET " + target + b" HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    assert status_of(reply) == 400, reply[:200]
    assert b"sqlite" not in reply.partition(b"\r\n\r\n")[2]
