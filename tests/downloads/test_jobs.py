"""Unit tests of the downloads package: parsing, the partial file, the store, the resume rules."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from relay.config import Config, Route
from relay.downloads.errors import JobFailed
from relay.downloads.fetch import Fetcher, request_headers
from relay.downloads.intake import parse_order, path_for_url
from relay.downloads.model import Job, JobState
from relay.downloads.names import DataDir, check_name, name_from_path, new_job_id
from relay.downloads.rate import RateMeter
from relay.downloads.store import JobStore
from relay.errors import BadPath, InvalidField
from relay.http.continuation import DOWNLOAD_BACKOFF
from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.ranges import (
    Unsatisfiable,
    parse_content_range,
    parse_range,
    parse_unsatisfied_range,
)
from relay.http.validators import resume_validator
from relay.net.routing import RouteTable, Target
from relay.net.upstream import Upstream
from relay.transfer import PartialFile
from tests.mock_bodies import ChunkedBody

ROUTE = Route(prefix="/o/", upstream="http://upstream.test/base/")
URL = "http://upstream.test/base/file.bin"
BODY = bytes(range(256)) * 40  # 10240 bytes
BODY_SHA = hashlib.sha256(BODY).hexdigest()
ETAG = '"v1"'


def b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


# ---- digests -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("repr-digest", f"sha-256=:{b64(BODY_SHA)}:"),
        ("repr-digest", f"sha-512=:AAAA:, sha-256=:{b64(BODY_SHA)}:"),
        ("digest", f"SHA-256={b64(BODY_SHA)}"),
        ("digest", f"md5=AAAA, sha-256={b64(BODY_SHA)}"),
        ("x-amz-checksum-sha256", b64(BODY_SHA)),
    ],
)
def test_digests_announced_sha256_is_read_from_each_spelling(name: str, value: str) -> None:
    """Repr-Digest, Digest and x-amz-checksum-sha256 all give the hex digest."""
    assert upstream_sha256(httpx.Headers({name: value})) == BODY_SHA


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"repr-digest": "sha-256=:not base64!:"},
        {"repr-digest": "sha-256=:AAAA:"},  # not 32 bytes
        {"digest": "sha-512=" + b64(BODY_SHA)},
        {"x-amz-checksum-sha256": b64(BODY_SHA) + "-3"},
        {"x-amz-checksum-sha256": b64(BODY_SHA), "x-amz-checksum-type": "COMPOSITE"},
        {"content-digest": f"sha-256=:{b64(BODY_SHA)}:"},  # the message's, not the object's
    ],
)
def test_digests_unusable_values_are_ignored(headers: dict[str, str]) -> None:
    """Malformed, wrong-length, composite or per-message digests announce nothing."""
    assert upstream_sha256(httpx.Headers(headers)) is None


def test_digests_that_disagree_are_a_conflict() -> None:
    """Two headers naming different digests make the object unverifiable."""
    headers = httpx.Headers(
        {"repr-digest": f"sha-256=:{b64(BODY_SHA)}:", "digest": f"sha-256={b64('00' * 32)}"}
    )
    with pytest.raises(DigestConflict):
        upstream_sha256(headers)


# ---- ranges and validators ------------------------------------------------------------------


def test_ranges_content_range_is_parsed_strictly() -> None:
    """Content-Range must be bytes start-end/total with start <= end < total."""
    parsed = parse_content_range("bytes 100-199/1000")
    assert parsed is not None
    assert (parsed.start, parsed.end, parsed.total) == (100, 199, 1000)
    assert parse_content_range("bytes 0-9/*") is not None
    for bad in (None, "", "bytes 5-4/10", "bytes 0-10/10", "items 0-1/2", "bytes */10"):
        assert parse_content_range(bad) is None
    assert parse_unsatisfied_range("bytes */1000") == 1000
    assert parse_unsatisfied_range("bytes 0-1/2") is None


def test_ranges_client_range_is_one_span_or_ignored() -> None:
    """One range is a span; several or malformed ones mean the whole file; past the end raises."""
    assert parse_range("bytes=0-9", 100) == (0, 10)
    assert parse_range("BYTES = 90-", 100) == (90, 100)
    assert parse_range("bytes=-10", 100) == (90, 100)
    assert parse_range("bytes=95-200", 100) == (95, 100)
    for ignored in (None, "bytes=0-1,3-4", "bytes=x", "bytes=-", "bytes=9-2", "lines=0-1"):
        assert parse_range(ignored, 100) is None
    for unsatisfiable in ("bytes=100-", "bytes=-0"):
        with pytest.raises(Unsatisfiable):
            parse_range(unsatisfiable, 100)
    with pytest.raises(Unsatisfiable):
        parse_range("bytes=-5", 0)


def test_validators_only_strong_ones_guard_a_resume() -> None:
    """A strong ETag, or a Last-Modified a second older than Date; never a weak ETag."""
    date = "Wed, 01 Jan 2025 00:00:10 GMT"
    assert resume_validator(httpx.Headers({"etag": ETAG})) == ETAG
    assert resume_validator(httpx.Headers({"etag": 'W/"v1"'})) is None
    older = {"last-modified": "Wed, 01 Jan 2025 00:00:00 GMT", "date": date}
    assert resume_validator(httpx.Headers(older)) == older["last-modified"]
    same_second = {"last-modified": date, "date": date}
    assert resume_validator(httpx.Headers(same_second)) is None
    assert resume_validator(httpx.Headers({"last-modified": date})) is None


# ---- names and intake -------------------------------------------------------------------------


def test_names_are_checked_against_the_allow_list() -> None:
    """Plain names pass; separators, dot-names, escapes, NUL and long names raise (400)."""
    for good in ("a", "file.tar.gz", "A-Z_0.9", "x" * 200, "-dash"):
        assert check_name(good) == good
    for bad in ("", ".", "..", ".env", "a/b", "a\\b", "a%2fb", "a\x00", "x" * 201, "é", 5):
        with pytest.raises(InvalidField) as info:
            check_name(bad)
        assert info.value.status_code == 400


def test_names_derived_from_paths_are_safe() -> None:
    """The last segment, percent-decoded, unsafe runs replaced, leading dots dropped."""
    assert name_from_path("/gh/org/repo/file.tar.gz") == "file.tar.gz"
    assert name_from_path("/o/a%20b%2Fc?q=1") == "a_b_c"
    assert name_from_path("/o/..%2F..%2Fetc") == "_.._etc"
    assert name_from_path("/o/.env") == "env"
    assert name_from_path("/o/") == "o"
    assert name_from_path("/o/%2e%2e") == "download"
    assert len(name_from_path("/o/" + "x" * 500)) == 200


def test_names_data_dir_refuses_paths_that_leave_it(tmp_path: Path) -> None:
    """A symlink planted under files/ cannot point a write outside its directory."""
    data = DataDir(tmp_path)
    data.create()
    (data.files_dir / "link").symlink_to(tmp_path.parent)
    with pytest.raises(ValueError, match="outside"):
        data.file("link")
    with pytest.raises(ValueError, match="file name"):
        data.file("../x")
    with pytest.raises(ValueError, match="job id"):
        data.partial("../../x")
    assert data.partial("a" * 32) == data.partial_dir / ("a" * 32 + ".partial")


def test_intake_maps_urls_onto_routes_and_checks_them() -> None:
    """A URL under a route's upstream becomes that route's path; the path checks still apply."""
    table = RouteTable((ROUTE, Route(prefix="/deep/", upstream="http://upstream.test/base/x/")))
    assert path_for_url("HTTP://Upstream.TEST/base/a/b", table) == "/o/a/b"
    assert path_for_url("http://upstream.test/base/x/y?z=1", table) == "/deep/y?z=1"
    order = parse_order({"url": "http://upstream.test/base/f.bin?sig=1", "size": 5}, table)
    assert (order.path, order.url, order.name, order.size) == (
        "/o/f.bin?sig=1",
        "http://upstream.test/base/f.bin?sig=1",
        "f.bin",
        5,
    )
    for url in ("http://upstream.test@evil.test/base/x", "http://upstream.test/bas"):
        with pytest.raises(Exception, match="no configured route"):
            path_for_url(url, table)
    with pytest.raises(InvalidField) as info:
        parse_order({"url": "http://upstream.test/base/%2e%2e/etc"}, table)
    assert info.value.status_code == BadPath.status_code


# ---- rate -------------------------------------------------------------------------------------


def test_rate_is_smoothed_and_decays_when_nothing_arrives() -> None:
    """Half-second samples, exponentially weighted; silence pulls the rate towards zero."""
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0])
    assert meter.bytes_per_second() is None
    for _ in range(20):
        meter.add(50_000)
        now[0] += 0.05
    rate = meter.bytes_per_second()
    assert rate is not None
    assert 900_000 < rate < 1_100_000
    now[0] += 10
    decayed = meter.bytes_per_second()
    assert decayed is not None
    assert decayed < rate / 10


# ---- the store ---------------------------------------------------------------------------------


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[JobStore]:
    db = JobStore(tmp_path / "jobs.sqlite3")
    await db.open()
    try:
        yield db
    finally:
        await db.close()


def make_job(**fields: object) -> Job:
    values: dict[str, object] = {"id": new_job_id(), "path": "/o/f", "url": URL, "name": "f"}
    values.update(fields)
    return Job(**values)  # type: ignore[arg-type]


async def test_store_round_trips_every_field(store: JobStore) -> None:
    """A saved job reads back equal, field by field."""
    job = make_job(
        expected_sha256=BODY_SHA,
        expected_size=10,
        state=JobState.RUNNING,
        bytes_done=5,
        total=10,
        attempts=2,
        validator=ETAG,
        byte_ranges=True,
        upstream_sha256=BODY_SHA,
    )
    await store.save(job)
    loaded = await store.get(job.id)
    assert loaded is not None
    assert loaded.to_json() | {"rate": None, "eta_seconds": None} == job.to_json() | {
        "rate": None,
        "eta_seconds": None,
    }
    assert (loaded.validator, loaded.byte_ranges, loaded.key) == (ETAG, True, job.key)


async def test_store_queries_unfinished_latest_and_completed(store: JobStore) -> None:
    """unfinished() oldest first; latest() newest first; completed lookups by key and name."""
    old = make_job(state=JobState.RUNNING, created=1.0)
    queued = make_job(state=JobState.QUEUED, created=2.0)
    done = make_job(state=JobState.COMPLETED, created=3.0, name="done", sha256=BODY_SHA)
    failed = make_job(state=JobState.FAILED, created=4.0)
    for job in (old, queued, done, failed):
        await store.save(job)
    assert [j.id for j in await store.unfinished()] == [old.id, queued.id]
    assert [j.id for j in await store.latest(3)] == [failed.id, done.id, queued.id]
    found = await store.completed_with_key(done.key)
    assert found is not None
    assert found.id == done.id
    by_name = await store.completed_with_name("done")
    assert by_name is not None
    assert by_name.id == done.id
    await store.delete(done.id)
    assert await store.get(done.id) is None


async def test_store_uses_wal(store: JobStore, tmp_path: Path) -> None:
    """The store is in WAL mode (readers never block the writer thread)."""
    await store.save(make_job())
    assert (tmp_path / "jobs.sqlite3-wal").exists()


# ---- the resume rules (scripted upstream) -------------------------------------------------------

Reply = Callable[[httpx.Request], httpx.Response]


def whole(request: httpx.Request, *, etag: str = ETAG, cut: int | None = None) -> httpx.Response:
    body = BODY if cut is None else BODY[:cut]
    return httpx.Response(
        200,
        headers={"etag": etag, "accept-ranges": "bytes", "content-length": str(len(BODY))},
        stream=ChunkedBody(body, cut=cut is not None),
    )


def part(request: httpx.Request, *, start: int, cr: str = "") -> httpx.Response:
    """A 206 from `start`; `cr` replaces its Content-Range ("-": none at all)."""
    headers = {
        "etag": ETAG,
        "content-range": cr or f"bytes {start}-{len(BODY) - 1}/{len(BODY)}",
        "content-length": str(len(BODY) - start),
    }
    if cr == "-":
        del headers["content-range"]
    return httpx.Response(206, headers=headers, stream=ChunkedBody(BODY[start:]))


class Scripted:
    """An upstream answering each request with the next reply; it records the requests."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.replies.pop(0)(request)

    def ranges(self) -> list[str | None]:
        return [r.headers.get("range") for r in self.requests]


async def run_fetch(
    tmp_path: Path, script: Scripted, *, attempts: int = 3, **fields: object
) -> tuple[Job, PartialFile]:
    job = make_job(**fields)
    async with httpx.AsyncClient(transport=httpx.MockTransport(script)) as client:
        upstream = Upstream(client, Config(routes=(ROUTE,)))
        partial = await PartialFile.open(tmp_path / f"{job.id}.partial")
        fetcher = Fetcher(
            upstream,
            job,
            Target(route=ROUTE, rest=URL.removeprefix(ROUTE.upstream)),
            partial,
            resume_attempts=attempts,
            checkpoint=_nothing,
            sleep=_no_wait,
        )
        try:
            await fetcher.run()
        finally:
            await partial.close()
    return job, partial


async def _nothing() -> None:
    return None


async def _no_wait(seconds: float) -> None:
    return None


async def test_fetch_resumes_with_range_and_if_range(tmp_path: Path) -> None:
    """After a cut, bytes=N- with If-Range: the ETag; the 206 is appended."""
    script = Scripted(lambda r: whole(r, cut=3000), lambda r: part(r, start=3000))
    job, partial = await run_fetch(tmp_path, script)
    assert script.ranges() == [None, "bytes=3000-"]
    assert script.requests[1].headers["if-range"] == ETAG
    assert partial.hexdigest() == BODY_SHA
    assert (job.attempts, job.total, job.bytes_done) == (2, len(BODY), len(BODY))


async def test_fetch_a_200_to_a_resume_restarts_from_zero(tmp_path: Path) -> None:
    """A changed object (200 to a range request) replaces the partial, never appends."""
    script = Scripted(lambda r: whole(r, cut=3000), lambda r: whole(r, etag='"v2"'))
    job, partial = await run_fetch(tmp_path, script)
    assert partial.hexdigest() == BODY_SHA
    assert job.validator == '"v2"'


@pytest.mark.parametrize(
    "bad",
    [
        "bytes 2999-10239/10240",  # wrong start
        "bytes 3000-10238/10240",  # does not reach the end
        "bytes 3000-20479/20480",  # another length
        None,  # missing
    ],
)
async def test_fetch_a_wrong_206_restarts_from_zero_once_then_fails(
    tmp_path: Path, bad: str | None
) -> None:
    """A 206 that does not continue at N: start again from zero once; a second one fails."""
    bad_206: Reply = lambda r: part(r, start=3000, cr=bad or "-")  # noqa: E731
    recovered = Scripted(lambda r: whole(r, cut=3000), bad_206, lambda r: whole(r))
    _, partial = await run_fetch(tmp_path, recovered)
    assert recovered.ranges() == [None, "bytes=3000-", None]
    assert partial.hexdigest() == BODY_SHA

    again = Scripted(
        lambda r: whole(r, cut=3000),
        bad_206,
        lambda r: whole(r, cut=3000),
        bad_206,
    )
    with pytest.raises(JobFailed, match="Content-Range"):
        await run_fetch(tmp_path, again)


async def test_fetch_416_is_never_appended(tmp_path: Path) -> None:
    """A 416 for a partial that is already whole completes it; any other 416 restarts."""
    complete = Scripted(
        lambda r: whole(r, cut=len(BODY)),
        lambda r: httpx.Response(416, headers={"content-range": f"bytes */{len(BODY)}"}),
    )
    _, partial = await run_fetch(tmp_path, complete)
    assert partial.hexdigest() == BODY_SHA

    refused = Scripted(
        lambda r: whole(r, cut=3000),
        lambda r: httpx.Response(416, content=b"garbage", headers={"content-range": "bytes */5"}),
        lambda r: whole(r),
    )
    _, partial = await run_fetch(tmp_path, refused)
    assert refused.ranges() == [None, "bytes=3000-", None]
    assert partial.hexdigest() == BODY_SHA


async def test_fetch_without_a_strong_validator_starts_over(tmp_path: Path) -> None:
    """No strong ETag/Last-Modified: no Range is ever sent; the retry fetches from zero."""
    script = Scripted(lambda r: whole(r, etag='W/"weak"', cut=3000), lambda r: whole(r))
    _, partial = await run_fetch(tmp_path, script)
    assert script.ranges() == [None, None]
    assert partial.hexdigest() == BODY_SHA


async def test_fetch_retries_5xx_but_not_4xx(tmp_path: Path) -> None:
    """503 is retried; 403 fails the job at once."""
    script = Scripted(lambda r: httpx.Response(503), lambda r: whole(r))
    job, _ = await run_fetch(tmp_path, script)
    assert job.attempts == 2
    with pytest.raises(JobFailed, match="upstream answered 403"):
        await run_fetch(tmp_path, Scripted(lambda r: httpx.Response(403)))


async def test_fetch_stops_at_more_bytes_than_expected(tmp_path: Path) -> None:
    """A body running past its expected size is cut off, not stored to the end."""
    script = Scripted(
        lambda r: httpx.Response(200, stream=ChunkedBody(BODY))  # no length: chunked
    )
    with pytest.raises(JobFailed, match="more than 5000 bytes"):
        await run_fetch(tmp_path, script, expected_size=5000)


async def test_fetch_sends_only_relays_own_headers_and_the_route_credential() -> None:
    """Downloads send identity encoding, relay's User-Agent and Via, and the route's credential."""
    route = Route(prefix="/c/", upstream="http://upstream.test/", credential="Bearer t")
    headers = dict(request_headers(route, [("range", "bytes=5-")]))
    assert headers["accept-encoding"] == "identity"
    assert headers["user-agent"].startswith("relay/")
    assert headers["via"] == "1.1 relay"
    assert headers["range"] == "bytes=5-"
    assert headers["Authorization"] == "Bearer t"
    assert "Authorization" not in dict(request_headers(ROUTE, []))


def test_fetch_backoff_doubles_and_is_capped() -> None:
    """0.2 s, 0.4 s, 0.8 s, ... never more than 10 s."""
    assert [DOWNLOAD_BACKOFF.delay(k) for k in (1, 2, 3)] == [0.2, 0.4, 0.8]
    assert DOWNLOAD_BACKOFF.delay(50) == 10.0
