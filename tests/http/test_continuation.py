"""relay.http.continuation: the one rule set for continuing a body, its edge cases in tables."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from relay import Config, Route, create_app
from relay.errors import TransferAborted
from relay.http.continuation import (
    DOWNLOAD_BACKOFF,
    FETCH_BACKOFF,
    RETRY_STATUSES,
    STREAM_BACKOFF,
    Backoff,
    Continuation,
    Next,
    Retries,
    content_length,
    retry_after,
    validator_for,
    whole_range_total,
)
from tests.asgi import Client, http_scope, lifespan_state
from tests.mock_bodies import ChunkedBody

ETAG = '"v1"'
LM = "Wed, 01 Jan 2025 00:00:00 GMT"
DATE = "Thu, 02 Jan 2025 00:00:00 GMT"
BY_ETAG = Continuation(validator=ETAG, total=100)
BY_DATE = Continuation(validator=LM, total=100)
CLIENT_RANGE = Continuation(validator=ETAG, start=10, end=59, total=100)
UNKNOWN_TOTAL = Continuation(validator=ETAG)


def h(**headers: str) -> httpx.Headers:
    return httpx.Headers({k.replace("_", "-"): v for k, v in headers.items()})


def response(status: int, method: str = "GET", **headers: str) -> httpx.Response:
    return httpx.Response(status, headers=h(**headers), request=httpx.Request(method, "http://u/"))


@pytest.mark.parametrize(
    ("plan", "have", "status", "headers", "expected", "reason"),
    [
        # a continuation: 206 at the offset, same total, same validator
        (BY_ETAG, 40, 206, h(content_range="bytes 40-99/100", etag=ETAG), Next.APPEND, ""),
        (BY_DATE, 40, 206, h(content_range="bytes 40-99/100", last_modified=LM), Next.APPEND, ""),
        (CLIENT_RANGE, 5, 206, h(content_range="bytes 15-59/100", etag=ETAG), Next.APPEND, ""),
        (UNKNOWN_TOTAL, 40, 206, h(content_range="bytes 40-99/100", etag=ETAG), Next.APPEND, ""),
        # another version: never appended
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-99/100", etag='"v2"'),
            Next.CHANGED,
            "validator changed",
        ),
        (BY_ETAG, 40, 206, h(content_range="bytes 40-99/100"), Next.CHANGED, "without the ETag"),
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-99/100", etag='W/"v1"'),
            Next.CHANGED,
            "validator changed",
        ),
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-99/100", last_modified=LM),
            Next.CHANGED,
            "without the ETag",
        ),
        (
            BY_DATE,
            40,
            206,
            h(content_range="bytes 40-99/100", last_modified=DATE),
            Next.CHANGED,
            "validator changed",
        ),
        (
            BY_DATE,
            40,
            206,
            h(content_range="bytes 40-99/100", etag=ETAG),
            Next.CHANGED,
            "without the Last-Modified",
        ),
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-100/101", etag=ETAG),
            Next.CHANGED,
            "total is 101, not 100",
        ),
        # not a continuation of this body at all
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 0-99/100", etag=ETAG),
            Next.BAD_RANGE,
            "started at byte 0, not 40",
        ),
        (BY_ETAG, 40, 206, h(content_range="bytes 41-99/100", etag=ETAG), Next.BAD_RANGE, "not 40"),
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-98/100", etag=ETAG),
            Next.BAD_RANGE,
            "ends at byte 98, not 99",
        ),
        (
            CLIENT_RANGE,
            5,
            206,
            h(content_range="bytes 15-99/100", etag=ETAG),
            Next.BAD_RANGE,
            "ends at byte 99, not 59",
        ),
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-99/*", etag=ETAG),
            Next.BAD_RANGE,
            "without the total",
        ),
        (BY_ETAG, 40, 206, h(etag=ETAG), Next.BAD_RANGE, "without a single Content-Range"),
        (
            BY_ETAG,
            40,
            206,
            h(content_range="bytes 40-99/100, 0-1/100"),
            Next.BAD_RANGE,
            "Content-Range",
        ),
        # the whole object again
        (BY_ETAG, 40, 200, h(etag='"v2"', content_length="100"), Next.RESTART, "200, not 206"),
        # 416: complete only when the bytes already had are the whole object
        (BY_ETAG, 100, 416, h(content_range="bytes */100"), Next.COMPLETE, ""),
        (BY_ETAG, 40, 416, h(content_range="bytes */100"), Next.REFUSED, "416, length 100"),
        (BY_ETAG, 40, 416, h(), Next.REFUSED, "416, length None"),
        (BY_ETAG, 40, 416, h(content_range="bytes */40"), Next.CHANGED, "from 100 to 40"),
        (CLIENT_RANGE, 90, 416, h(content_range="bytes */100"), Next.REFUSED, "416"),
        # other statuses
        *[(BY_ETAG, 40, s, h(), Next.RETRY, f"{s}, not 206") for s in sorted(RETRY_STATUSES)],
        (BY_ETAG, 40, 404, h(), Next.FAIL, "404, not 206"),
        (BY_ETAG, 40, 304, h(), Next.FAIL, "304, not 206"),
        (BY_ETAG, 40, 412, h(), Next.FAIL, "412, not 206"),
    ],
)
def test_judge(
    plan: Continuation,
    have: int,
    status: int,
    headers: httpx.Headers,
    expected: Next,
    reason: str,
) -> None:
    verdict = plan.judge(status, headers, have)
    assert verdict.next is expected, verdict
    assert reason in verdict.reason
    assert verdict.continues == (expected is Next.APPEND)
    assert bool(verdict.reason) == (expected not in (Next.APPEND, Next.COMPLETE))


def test_a_continuation_gives_the_length_it_learned() -> None:
    verdict = UNKNOWN_TOTAL.judge(206, h(content_range="bytes 40-99/100", etag=ETAG), 40)
    assert verdict.total == 100


@pytest.mark.parametrize(
    ("first", "expected"),
    [
        (
            response(200, etag=ETAG, accept_ranges="bytes", content_length="100"),
            Continuation(ETAG, 0, 99, 100),
        ),
        (response(200, etag=ETAG, accept_ranges="bytes"), Continuation(ETAG, 0, None, None)),
        (
            response(206, etag=ETAG, accept_ranges="bytes", content_range="bytes 10-59/100"),
            Continuation(ETAG, 10, 59, 100),
        ),
        (
            response(200, last_modified=LM, date=DATE, accept_ranges="bytes", content_length="9"),
            Continuation(LM, 0, 8, 9),
        ),
        # no resume at all
        (response(200, etag='W/"weak"', accept_ranges="bytes", content_length="10"), None),
        (response(200, etag=ETAG, content_length="10"), None),
        (response(200, etag=ETAG, accept_ranges="none", content_length="10"), None),
        (response(200, accept_ranges="bytes", content_length="10"), None),
        (response(200, last_modified=LM, date=LM, accept_ranges="bytes"), None),
        (response(200, "HEAD", etag=ETAG, accept_ranges="bytes"), None),
        (
            response(206, etag=ETAG, accept_ranges="bytes", content_type="multipart/byteranges"),
            None,
        ),
        (response(304, etag=ETAG, accept_ranges="bytes"), None),
    ],
)
def test_for_response(first: httpx.Response, expected: Continuation | None) -> None:
    assert Continuation.for_response(first) == expected


@pytest.mark.parametrize(
    ("plan", "have", "expected"),
    [
        (BY_ETAG, 40, [("range", "bytes=40-"), ("if-range", ETAG)]),
        (Continuation(ETAG, 0, 99, 100), 40, [("range", "bytes=40-99"), ("if-range", ETAG)]),
        (CLIENT_RANGE, 5, [("range", "bytes=15-59"), ("if-range", ETAG)]),
        (BY_DATE, 1, [("range", "bytes=1-"), ("if-range", LM)]),
    ],
)
def test_request_headers(plan: Continuation, have: int, expected: list[tuple[str, str]]) -> None:
    assert plan.request_headers(have) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (h(content_length="100"), 100),
        (h(content_length=" 100 "), 100),
        (h(content_length="0"), 0),
        (h(), None),
        (h(content_length=""), None),
        (h(content_length="-1"), None),
        (h(content_length="1e3"), None),
        (h(content_length="10, 10"), None),
        (httpx.Headers([("content-length", "²")], encoding="latin-1"), None),
        (h(content_length="100", transfer_encoding="chunked"), None),
    ],
)
def test_content_length(headers: httpx.Headers, expected: int | None) -> None:
    assert content_length(headers) == expected


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (h(etag=ETAG, accept_ranges="bytes"), ETAG),
        (h(etag=ETAG, accept_ranges="none, bytes"), ETAG),
        (h(etag=ETAG), None),
        (h(etag='W/"a"', accept_ranges="bytes"), None),
        (h(etag='W/"a"', last_modified=LM, date=DATE, accept_ranges="bytes"), LM),
        (h(last_modified=LM, date=LM, accept_ranges="bytes"), None),
    ],
)
def test_validator_for(headers: httpx.Headers, expected: str | None) -> None:
    assert validator_for(headers) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-99/100", 100),
        ("bytes 0-98/100", None),
        ("bytes 1-99/100", None),
        ("bytes 0-99/*", None),
        (None, None),
    ],
)
def test_whole_range_total(value: str | None, expected: int | None) -> None:
    headers = h(content_range=value) if value is not None else h()
    assert whole_range_total(headers) == expected


@pytest.mark.parametrize(
    ("backoff", "delays"),
    [
        (STREAM_BACKOFF, [0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0]),
        (DOWNLOAD_BACKOFF, [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0]),
        (FETCH_BACKOFF, [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]),
        (Backoff(first=0, cap=10), [0.0] * 7),
    ],
)
def test_backoff_doubles_up_to_its_cap(backoff: Backoff, delays: list[float]) -> None:
    assert [backoff.delay(k) for k in range(1, 8)] == pytest.approx(delays)


def test_backoff_honours_retry_after_up_to_the_cap() -> None:
    assert STREAM_BACKOFF.delay(1, retry_after=1.0) == 1.0
    assert STREAM_BACKOFF.delay(1, retry_after=120.0) == 2.0
    assert FETCH_BACKOFF.delay(5, retry_after=0.0) == 8.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", 3.0), (" 0 ", 0.0), ("Wed, 01 Jan 2025 00:00:00 GMT", None), ("-1", None), ("", None)],
)
def test_retry_after(value: str, expected: float | None) -> None:
    assert retry_after(h(retry_after=value)) == expected


def test_retries_allow_limit_retries_then_stop() -> None:
    retries = Retries(2, STREAM_BACKOFF)
    assert [retries.fail(), retries.fail(), retries.fail()] == [True, True, False]
    assert retries.failures == 3
    assert Retries(0, STREAM_BACKOFF).fail() is False


def test_retries_with_progress_start_counting_again() -> None:
    """Failures in a row count; an attempt that got `progress` bytes further resets them."""
    retries = Retries(1, DOWNLOAD_BACKOFF, progress=1000, position=500)
    assert retries.fail(600) is True
    assert retries.fail(1499) is False  # 999 bytes further: not progress
    retries = Retries(1, DOWNLOAD_BACKOFF, progress=1000, position=500)
    assert retries.fail(600) is True
    assert retries.fail(1500) is True  # 1000 bytes further than the furthest: counted anew
    assert retries.failures == 1
    assert retries.delay() == 0.2
    assert retries.fail(1600) is False


# ---- a stream's resume requests, against a scripted upstream -------------------------------------

BODY = bytes(range(256)) * 40
ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/"),)
WHOLE = {"etag": ETAG, "accept-ranges": "bytes", "content-length": str(len(BODY))}


class _Upstream:
    """Answers each request with the next scripted (status, headers, body); records them."""

    def __init__(self, *replies: tuple[int, dict[str, str], ChunkedBody]) -> None:
        self.replies = list(replies)
        self.bodies = [body for _, _, body in replies]
        self.ranges: list[str | None] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.ranges.append(request.headers.get("range"))
        status, headers, body = self.replies.pop(0)
        return httpx.Response(status, headers=headers, stream=body)


async def _relay(upstream: _Upstream, resume_attempts: int) -> Client:
    config = Config(routes=ROUTES, resume_attempts=resume_attempts)
    app = create_app(config, transport=httpx.MockTransport(upstream))
    client = Client()
    async with lifespan_state(app) as state:
        await asyncio.wait_for(app(http_scope(state, "/o/f"), client.receive, client.send), 30)
    return client


def _body_of(client: Client) -> bytes:
    return b"".join(m.get("body", b"") for m in client.messages if m["type"].endswith("body"))


async def test_stream_resume_answered_503_is_retried_within_resume_attempts() -> None:
    """A transient status to the resume request is one failed attempt; the next one continues."""
    part = {"etag": ETAG, "content-range": f"bytes 3000-{len(BODY) - 1}/{len(BODY)}"}
    upstream = _Upstream(
        (200, WHOLE, ChunkedBody(BODY[:3000], cut=True)),
        (503, {"retry-after": "0"}, ChunkedBody(b"busy")),
        (206, part, ChunkedBody(BODY[3000:])),
    )
    client = await _relay(upstream, resume_attempts=2)
    assert _body_of(client) == BODY
    assert client.messages[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    resume = f"bytes=3000-{len(BODY) - 1}"
    assert upstream.ranges == [None, resume, resume]
    assert all(body.closed for body in upstream.bodies)


async def test_stream_resume_statuses_spend_resume_attempts_then_abort() -> None:
    """The body's cut and each 503 to a resume count: resume_attempts=2 allows two resumes."""
    upstream = _Upstream(
        (200, WHOLE, ChunkedBody(BODY[:3000], cut=True)),
        (503, {}, ChunkedBody(b"busy")),
        (503, {}, ChunkedBody(b"busy")),
    )
    with pytest.raises(TransferAborted, match="resume answered 503"):
        await _relay(upstream, resume_attempts=2)
    assert len(upstream.ranges) == 3
    assert all(body.closed for body in upstream.bodies)


# ---- a body pinned by its digest ----------------------------------------------------------------

PIN = "ab" * 32
PINNED = Continuation(validator="", total=100, end=99, pinned=PIN)
_SHA256_B64 = "q6urq6urq6urq6urq6urq6urq6urq6urq6urq6urq6s="  # base64 of bytes.fromhex(PIN)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (h(content_range="bytes 40-99/100"), Next.APPEND),
        (h(content_range="bytes 40-99/100", etag='"anything"'), Next.APPEND),
        (h(content_range="bytes 40-99/100", repr_digest=f"sha-256=:{_SHA256_B64}:"), Next.APPEND),
        (
            h(content_range="bytes 40-99/100", repr_digest="sha-256=:" + "A" * 43 + "=:"),
            Next.CHANGED,
        ),
        (h(content_range="bytes 40-99/101"), Next.CHANGED),
        (h(content_range="bytes 41-99/100"), Next.BAD_RANGE),
    ],
)
def test_a_body_pinned_by_its_digest_continues_without_a_validator(
    headers: httpx.Headers, expected: Next
) -> None:
    """If the body is named by a SHA-256 the caller verifies, a 206 at the offset with the
    same total continues it whatever its validator; one announcing another digest does not."""
    assert PINNED.judge(206, headers, 40).next is expected


def test_a_pinned_plan_asks_for_the_rest_without_if_range() -> None:
    assert PINNED.request_headers(40) == [("range", "bytes=40-99")]


@pytest.mark.parametrize(
    ("status", "headers", "pinned", "expected"),
    [
        # no validator, no Accept-Ranges: continued by the digest and the length
        (200, {"content-length": "100"}, PIN, PINNED),
        (200, {"content-length": "100"}, None, None),
        (200, {}, PIN, None),  # pinned, but where it ends is not known
        (
            206,
            {"content-range": "bytes 10-19/100"},
            PIN,
            Continuation(validator="", start=10, end=19, total=100, pinned=PIN),
        ),
        (206, {"content-range": "bytes 10-19/*"}, PIN, None),
        # a strong validator stays what a continuation is judged by
        (
            200,
            {"content-length": "100", "etag": ETAG, "accept-ranges": "bytes"},
            PIN,
            Continuation(validator=ETAG, end=99, total=100, pinned=PIN),
        ),
    ],
)
def test_which_first_responses_a_pin_makes_continuable(
    status: int, headers: dict[str, str], pinned: str | None, expected: object
) -> None:
    plan = Continuation.for_response(response(status, **headers), pinned=pinned)
    assert plan == expected
