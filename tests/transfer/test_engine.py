"""The transfer engine against scripted upstreams (httpx.MockTransport): one rule per test."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from relay.http.continuation import Backoff
from relay.transfer import Events, PartialFile, Policy, Representation, Transfer, describe
from relay.transfer.errors import (
    AttemptFailed,
    TransferError,
    UnexpectedStatus,
    UnusableResume,
    VerificationFailed,
)
from tests.mock_bodies import ChunkedBody

URL = "http://upstream.test/file.bin"
BODY = bytes(range(256)) * 40  # 10240 bytes
BODY_SHA = hashlib.sha256(BODY).hexdigest()
ETAG = '"v1"'
NO_WAIT = Backoff(first=0.0, cap=0.0)

Reply = Callable[[httpx.Request], httpx.Response]


def whole(
    *, cut: int | None = None, etag: str | None = ETAG, extra: dict[str, str] | None = None
) -> Reply:
    """A 200 with the whole body (or its first `cut` bytes, then a reset)."""
    headers = {"content-length": str(len(BODY)), "accept-ranges": "bytes", **(extra or {})}
    if etag is not None:
        headers["etag"] = etag
    data = BODY if cut is None else BODY[:cut]
    return lambda request: httpx.Response(
        200, headers=headers, stream=ChunkedBody(data, cut=cut is not None)
    )


def part(start: int, *, content_range: str | None = None, etag: str = ETAG) -> Reply:
    """A 206 from `start` to the end; `content_range` replaces its Content-Range."""
    headers = {
        "etag": etag,
        "content-range": content_range or f"bytes {start}-{len(BODY) - 1}/{len(BODY)}",
        "content-length": str(len(BODY) - start),
    }
    return lambda request: httpx.Response(206, headers=headers, stream=ChunkedBody(BODY[start:]))


def status(code: int, **headers: str) -> Reply:
    return lambda request: httpx.Response(code, headers=headers, stream=ChunkedBody(b""))


class Upstream:
    """Answers each request with the next reply; records requests and responses."""

    def __init__(self, *replies: Reply) -> None:
        self.replies = list(replies)
        self.requests: list[httpx.Request] = []
        self.bodies: list[ChunkedBody] = []
        self.client = httpx.AsyncClient(transport=httpx.MockTransport(self._answer))

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        response = self.replies.pop(0)(request)
        assert isinstance(response.stream, ChunkedBody)
        self.bodies.append(response.stream)
        return response

    async def open(self, extra: list[tuple[str, str]]) -> httpx.Response:
        request = self.client.build_request("GET", URL, headers=extra)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TransportError as exc:
            raise AttemptFailed(describe(exc)) from exc

    def ranges(self) -> list[str | None]:
        return [r.headers.get("range") for r in self.requests]


class Told(Events):
    """Every event, in order, as one line each."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.delays: list[float] = []

    async def head(self, representation: Representation, response: httpx.Response) -> None:
        self.lines.append(f"head {response.status_code} {representation}")

    async def restarting(self, reason: str) -> None:
        self.lines.append(f"restarting: {reason}")

    def retrying(self, error: AttemptFailed, delay: float, failures: int) -> None:
        self.lines.append(f"retrying #{failures}: {error.reason}")
        self.delays.append(delay)


async def _no_wait(seconds: float) -> None:
    return None


async def transfer(
    tmp_path: Path,
    upstream: Upstream,
    *,
    retries: int = 3,
    backoff: Backoff = NO_WAIT,
    progress: int | None = None,
    restart_bad_range: bool = True,
    known: Representation | None = None,
    expected_size: int | None = None,
    events: Events | None = None,
) -> tuple[Transfer, PartialFile]:
    """Run a transfer into tmp_path/x.partial (the partial is returned closed)."""
    tmp_path.mkdir(exist_ok=True)
    partial = await PartialFile.open(tmp_path / "x.partial")
    engine = Transfer(
        upstream.open,
        partial,
        policy=Policy(
            retries=retries,
            backoff=backoff,
            progress=progress,
            restart_bad_range=restart_bad_range,
        ),
        known=known,
        expected_size=expected_size,
        events=events,
        sleep=_no_wait,
    )
    try:
        await engine.run()
    finally:
        await partial.close()
        await upstream.client.aclose()
    return engine, partial


def on_disk(tmp_path: Path) -> bytes:
    return (tmp_path / "x.partial").read_bytes()


# ---- resuming ---------------------------------------------------------------------------------


async def test_a_cut_body_is_resumed_with_range_and_if_range(tmp_path: Path) -> None:
    """After a reset at byte N the next request asks for bytes=N- with If-Range: the ETag."""
    upstream = Upstream(whole(cut=3000), part(3000))
    engine, partial = await transfer(tmp_path, upstream)
    assert upstream.ranges() == [None, "bytes=3000-"]
    assert upstream.requests[1].headers["if-range"] == ETAG
    assert (partial.hexdigest(), on_disk(tmp_path)) == (BODY_SHA, BODY)
    assert engine.representation == Representation(validator=ETAG, total=len(BODY))


async def test_a_partial_from_an_earlier_run_is_resumed_with_what_it_knew(tmp_path: Path) -> None:
    """A known representation and bytes on disk: the first request already asks for the rest."""
    (tmp_path / "x.partial").write_bytes(BODY[:4000])
    upstream = Upstream(part(4000))
    known = Representation(validator=ETAG, total=len(BODY))
    _, partial = await transfer(tmp_path, upstream, known=known)
    assert upstream.ranges() == ["bytes=4000-"]
    assert partial.hexdigest() == BODY_SHA


async def test_a_200_to_a_resume_replaces_the_bytes_had(tmp_path: Path) -> None:
    """The whole object again (it changed, or ranges are ignored): written from byte 0."""
    told = Told()
    upstream = Upstream(whole(cut=3000), whole(etag='"v2"'))
    engine, _ = await transfer(tmp_path, upstream, events=told)
    assert on_disk(tmp_path) == BODY
    assert engine.representation.validator == '"v2"'
    assert told.lines[2].startswith("restarting: the upstream sent the whole file")
    assert told.lines[3].startswith("head 200")


async def test_without_a_strong_validator_nothing_is_resumed(tmp_path: Path) -> None:
    """No strong ETag (or no Accept-Ranges): a cut body is fetched again from byte 0."""
    upstream = Upstream(whole(cut=3000, etag='W/"weak"'), whole(etag='W/"weak"'))
    _, partial = await transfer(tmp_path, upstream)
    assert upstream.ranges() == [None, None]
    assert partial.hexdigest() == BODY_SHA


@pytest.mark.parametrize(
    "unusable",
    [
        part(3000, etag='"v2"'),  # another version (an upstream ignoring If-Range)
        part(3000, content_range="bytes 3000-20479/20480"),  # another length
        status(416, **{"content-range": "bytes */5"}),  # refused
        part(3000, content_range="bytes 2999-10239/10240"),  # the wrong offset
    ],
    ids=["other-version", "other-length", "refused", "wrong-offset"],
)
async def test_an_unusable_resume_starts_again_once_then_fails(
    tmp_path: Path, unusable: Reply
) -> None:
    """Never appended: the body starts again from zero once; a second one ends the transfer."""
    recovered = Upstream(whole(cut=3000), unusable, whole())
    _, partial = await transfer(tmp_path, recovered)
    assert recovered.ranges() == [None, "bytes=3000-", None]
    assert partial.hexdigest() == BODY_SHA

    again = Upstream(whole(cut=3000), unusable, whole(cut=3000), unusable)
    with pytest.raises(UnusableResume, match="Content-Range"):
        await transfer(tmp_path / "again", again)


async def test_a_206_at_the_wrong_offset_ends_the_transfer_when_the_policy_says(
    tmp_path: Path,
) -> None:
    """restart_bad_range=False: an unusable 206 fails at once and the bytes had are kept."""
    upstream = Upstream(whole(cut=3000), part(0))
    with pytest.raises(UnusableResume, match="unusable 206"):
        await transfer(tmp_path, upstream, restart_bad_range=False)
    assert on_disk(tmp_path) == BODY[:3000]


async def test_a_416_for_bytes_already_whole_completes_without_a_body(tmp_path: Path) -> None:
    """A 416 saying the object is exactly as long as the bytes had: done, nothing appended."""
    upstream = Upstream(
        whole(cut=len(BODY)), status(416, **{"content-range": f"bytes */{len(BODY)}"})
    )
    engine, partial = await transfer(tmp_path, upstream)
    assert partial.hexdigest() == BODY_SHA
    assert engine.representation.total == len(BODY)


async def test_a_whole_206_to_a_plain_request_is_the_body(tmp_path: Path) -> None:
    """A 206 of bytes 0-(T-1)/T answers a request without Range with the whole object."""
    upstream = Upstream(part(0))
    engine, partial = await transfer(tmp_path, upstream)
    assert partial.hexdigest() == BODY_SHA
    assert engine.representation.validator == ETAG


async def test_a_partial_206_to_a_plain_request_is_unusable(tmp_path: Path) -> None:
    """A 206 of only some bytes, to a request for them all, is never taken for the body."""
    upstream = Upstream(part(5), part(5))
    with pytest.raises(UnusableResume, match="request for it all"):
        await transfer(tmp_path, upstream)


# ---- retries ----------------------------------------------------------------------------------


async def test_transient_statuses_are_retried_waiting_as_asked(tmp_path: Path) -> None:
    """503 and 429 are attempts that failed: the backoff waits, longer if Retry-After says."""
    told = Told()
    upstream = Upstream(status(503), status(429, **{"retry-after": "3"}), whole())
    backoff = Backoff(first=0.5, cap=10.0)
    _, partial = await transfer(tmp_path, upstream, backoff=backoff, events=told)
    assert partial.hexdigest() == BODY_SHA
    assert told.delays == [0.5, 3.0]


async def test_when_the_retries_are_spent_the_last_failure_is_raised(tmp_path: Path) -> None:
    """It says after how many failed attempts, and which status failed the last one."""
    upstream = Upstream(status(503), status(503), status(503))
    with pytest.raises(AttemptFailed) as info:
        await transfer(tmp_path, upstream, retries=2)
    assert info.value.failures == 3
    assert info.value.answer is not None
    assert (info.value.answer.status, info.value.answer.url) == (503, URL)


async def test_a_final_status_is_not_retried(tmp_path: Path) -> None:
    """404: one request, UnexpectedStatus naming it."""
    upstream = Upstream(status(404))
    with pytest.raises(UnexpectedStatus, match="upstream answered 404"):
        await transfer(tmp_path, upstream)
    assert len(upstream.requests) == 1


async def test_progress_starts_the_count_of_failures_again(tmp_path: Path) -> None:
    """With `progress`, attempts that each get 2000 bytes further are never given up on."""
    replies = [whole(cut=2000)]
    replies += [_cut_part(start, start + 2000) for start in range(2000, 10000, 2000)]
    upstream = Upstream(*replies, part(10000))
    _, partial = await transfer(tmp_path, upstream, retries=1, progress=2000)
    assert partial.hexdigest() == BODY_SHA
    assert len(upstream.requests) == 6

    stuck = Upstream(whole(cut=2000), _cut_part(2000, 2500))
    with pytest.raises(AttemptFailed, match="connection lost") as info:
        await transfer(tmp_path / "stuck", stuck, retries=1, progress=2000)
    assert info.value.failures == 2


def _cut_part(start: int, stop: int) -> Reply:
    """A 206 from `start` announcing the rest, reset after byte `stop`."""
    headers = {
        "etag": ETAG,
        "content-range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}",
        "content-length": str(len(BODY) - start),
    }
    return lambda request: httpx.Response(
        206, headers=headers, stream=ChunkedBody(BODY[start:stop], cut=True)
    )


# ---- sizes and digests -------------------------------------------------------------------------


async def test_a_body_past_its_length_is_cut_at_once(tmp_path: Path) -> None:
    """More bytes than Content-Length (or than expected, when unsized) never reach the disk."""
    unsized = Upstream(lambda request: httpx.Response(200, stream=ChunkedBody(BODY)))
    with pytest.raises(VerificationFailed, match="more than 5000 bytes"):
        await transfer(tmp_path, unsized, expected_size=5000)
    assert len(on_disk(tmp_path)) <= 5000


async def test_a_body_ending_short_without_an_error_is_a_size_mismatch(tmp_path: Path) -> None:
    """A transport that does not check framing: the short body is not taken as complete."""
    short = Upstream(
        lambda request: httpx.Response(
            200, headers={"content-length": "20000"}, stream=ChunkedBody(BODY)
        )
    )
    with pytest.raises(VerificationFailed, match="received 10240 bytes, expected 20000"):
        await transfer(tmp_path, short)


async def test_an_expected_size_the_upstream_contradicts_fails_at_the_head(
    tmp_path: Path,
) -> None:
    """The length the upstream announces is checked before any byte is written."""
    upstream = Upstream(whole())
    with pytest.raises(VerificationFailed, match="the upstream has 10240 bytes, 99 expected"):
        await transfer(tmp_path, upstream, expected_size=99)
    assert on_disk(tmp_path) == b""


async def test_the_announced_digest_is_kept_across_a_resume(tmp_path: Path) -> None:
    """Repr-Digest of the first answer stays known when the 206 does not repeat it."""
    digest = f"sha-256=:{base64.b64encode(bytes.fromhex(BODY_SHA)).decode()}:"
    upstream = Upstream(whole(cut=3000, extra={"repr-digest": digest}), part(3000))
    engine, _ = await transfer(tmp_path, upstream)
    assert engine.representation.sha256 == BODY_SHA


async def test_digest_headers_that_disagree_fail_the_transfer(tmp_path: Path) -> None:
    """Two spellings naming different digests: the object cannot be verified."""
    headers = {"repr-digest": "sha-256=:" + "A" * 43 + "=:", "digest": "sha-256=" + "B" * 43 + "="}
    upstream = Upstream(whole(extra=headers))
    with pytest.raises(VerificationFailed, match="disagree"):
        await transfer(tmp_path, upstream)


# ---- sinks, events and resources ---------------------------------------------------------------


class Stream:
    """A sink that cannot start over once it has bytes (like stdout)."""

    def __init__(self) -> None:
        self.data = bytearray()

    @property
    def size(self) -> int:
        return len(self.data)

    def hexdigest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    async def write(self, data: bytes) -> None:
        self.data += data

    async def restart(self) -> None:
        if self.data:
            raise TransferError(f"cannot start over: {len(self.data)} bytes already out")


async def test_a_sink_that_cannot_start_over_ends_the_transfer_saying_why() -> None:
    """No validator to resume with and bytes already out: both reasons, no second request."""
    upstream = Upstream(whole(cut=3000, etag=None), whole(etag=None))
    sink = Stream()
    engine = Transfer(
        upstream.open, sink, policy=Policy(retries=3, backoff=NO_WAIT), sleep=_no_wait
    )
    with pytest.raises(TransferError, match=r"^connection lost.*; cannot start over: 3000 bytes"):
        await engine.run()
    assert len(upstream.requests) == 1
    await upstream.client.aclose()


async def test_a_head_event_that_raises_ends_the_transfer_and_closes_the_response(
    tmp_path: Path,
) -> None:
    """What a program's hook raises passes through unchanged; the response is still closed."""

    class Refuse(Events):
        async def head(self, representation: Representation, response: httpx.Response) -> None:
            raise RuntimeError("quota")

    upstream = Upstream(whole())
    with pytest.raises(RuntimeError, match="quota"):
        await transfer(tmp_path, upstream, events=Refuse())
    assert [body.closed for body in upstream.bodies] == [True]
    assert on_disk(tmp_path) == b""


async def test_every_response_is_closed(tmp_path: Path) -> None:
    """Cut, refused, retried or complete: each response the engine opened is closed."""
    upstream = Upstream(
        whole(cut=3000), status(503), part(3000, etag='"v2"'), whole(cut=5000), part(5000)
    )
    await transfer(tmp_path, upstream)
    assert [body.closed for body in upstream.bodies] == [True] * 5


async def test_events_say_what_happens_in_order(tmp_path: Path) -> None:
    """head before each appended body; retrying after a failure; restarting before emptying."""
    told = Told()
    upstream = Upstream(whole(cut=3000), part(3000, etag='"v2"'), whole())
    await transfer(tmp_path, upstream, events=told)
    representation = Representation(validator=ETAG, total=len(BODY))
    assert told.lines[0] == f"head 200 {representation}"
    assert told.lines[1] == "retrying #1: connection lost: connection reset"
    assert told.lines[2].startswith("restarting: the file changed at byte 3000")
    assert told.lines[3] == f"head 200 {representation}"
