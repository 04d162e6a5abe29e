"""Transparent mid-stream resume: the client receives the whole body, with no seam."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from types import TracebackType

import httpx
import pytest

from relay.http.resume import ResumePlan
from relay.net.transports import PoolStats, make_transport
from tests.harness import RelayThread, relay_config, running_relay, sha256_stream
from tests.origin import Origin, body_bytes, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def ranged_requests(origin: Origin, marker: str) -> list[str | None]:
    return [r.header("range") for r in origin.requests if marker in r.target]


def test_upstream_cut_mid_body_is_resumed_transparently(relay: RelayThread, origin: Origin) -> None:
    """The client gets every byte and a clean end; relay re-requested the rest with If-Range."""
    marker = uuid.uuid4().hex
    size = 8 * MiB
    with (
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{relay.url}/o/gen/{size}?drop_once=1000000&key={marker}") as r,
    ):
        digest, received = sha256_stream(r)
    assert (digest, received) == (expected_sha256(size), size)
    records = [rec for rec in origin.requests if marker in rec.target]
    assert [rec.header("range") for rec in records] == [None, "bytes=1000000-8388607"]
    assert records[1].header("if-range") == f'"gen-{size}-v1"'
    assert relay.settled()


def test_clients_own_range_is_resumed_with_offset_arithmetic(
    relay: RelayThread, origin: Origin
) -> None:
    marker = uuid.uuid4().hex
    size = 4 * MiB
    response = httpx.get(
        f"{relay.url}/o/gen/{size}?drop_once=300000&key={marker}",
        headers={"Range": "bytes=1000000-2999999"},
        timeout=30,
    )
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 1000000-2999999/{size}"
    assert response.content == body_bytes(size, 1000000, 3000000)
    assert ranged_requests(origin, marker) == ["bytes=1000000-2999999", "bytes=1300000-2999999"]


def test_resume_attempts_are_bounded_then_the_transfer_is_aborted(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(read_timeout=0.3, resume_attempts=2)
    marker = uuid.uuid4().hex
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=30) as client,
        client.stream("GET", f"{relay.url}/o/gen/1m?stall_after=10000&m={marker}") as r,
    ):
        for _ in r.iter_raw():
            pass
    assert ranged_requests(origin, marker) == [None, "bytes=10000-1048575", "bytes=20000-1048575"]
    assert relay.settled()


def test_changed_object_is_not_spliced(relay: RelayThread, origin: Origin) -> None:
    """If-Range fails when the ETag changed: relay aborts instead of mixing two versions."""
    marker = uuid.uuid4().hex
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=30) as client,
        client.stream(
            "GET", f"{relay.url}/o/gen/1m?close_after=5000&etag_changes=1&m={marker}"
        ) as r,
    ):
        for _ in r.iter_raw():
            pass
    assert len(ranged_requests(origin, marker)) == 2
    assert relay.settled()


class _CutBody(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, cut_after: int) -> None:
        self._inner = inner
        self._cut_after = cut_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        sent = 0
        async for chunk in self._inner:
            if sent + len(chunk) >= self._cut_after:
                yield chunk[: self._cut_after - sent]
                raise httpx.RemoteProtocolError("injected cut")
            sent += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


class CuttingTransport(httpx.AsyncBaseTransport):
    """Wraps relay's transport; the first `cuts` responses die after `cut_after` bytes."""

    def __init__(self, inner: httpx.AsyncBaseTransport, *, cuts: int, cut_after: int) -> None:
        self.inner = inner
        self.cuts = cuts
        self.cut_after = cut_after

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.cuts <= 0:
            return response
        self.cuts -= 1
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CutBody(response.stream, self.cut_after),
            request=request,
            extensions=response.extensions,
        )

    async def __aenter__(self) -> CuttingTransport:
        await self.inner.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        await self.inner.aclose()

    def pool_stats(self) -> PoolStats:
        stats: PoolStats = self.inner.pool_stats()  # type: ignore[attr-defined]
        return stats


def test_256_mib_body_cut_three_times_arrives_byte_exact(origin: Origin) -> None:
    config = relay_config(origin.url, resume_attempts=3)
    transport = CuttingTransport(make_transport(config), cuts=3, cut_after=60 * MiB)
    marker = uuid.uuid4().hex
    size = 256 * MiB
    with (
        running_relay(config, transport=transport) as relay,
        httpx.Client(timeout=60) as client,
        client.stream("GET", f"{relay.url}/o/gen/{size}?m={marker}") as response,
    ):
        digest, received = sha256_stream(response)
        assert relay.settled()
    assert (digest, received) == (expected_sha256(size), size)
    assert ranged_requests(origin, marker) == [
        None,
        f"bytes={60 * MiB}-{size - 1}",
        f"bytes={120 * MiB}-{size - 1}",
        f"bytes={180 * MiB}-{size - 1}",
    ]


def _response(status: int, headers: dict[str, str], method: str = "GET") -> httpx.Response:
    return httpx.Response(status, headers=headers, request=httpx.Request(method, "http://u/x"))


@pytest.mark.parametrize(
    "headers",
    [
        {"etag": 'W/"weak"', "accept-ranges": "bytes", "content-length": "10"},
        {"etag": '"strong"', "content-length": "10"},
        {"accept-ranges": "bytes", "content-length": "10"},
        {"etag": '"s"', "accept-ranges": "none", "content-length": "10"},
    ],
)
def test_resume_needs_a_strong_validator_and_byte_ranges(headers: dict[str, str]) -> None:
    assert ResumePlan.for_response(_response(200, headers)) is None


def test_resume_plan_rejects_any_other_continuation() -> None:
    plan = ResumePlan.for_response(
        _response(200, {"etag": '"e"', "accept-ranges": "bytes", "content-length": "100"})
    )
    assert plan is not None
    assert plan.range_header(40) == "bytes=40-99"
    good = {"content-range": "bytes 40-99/100", "etag": '"e"'}
    assert plan.mismatch(_response(206, good), 40) is None
    assert plan.mismatch(_response(200, {}), 40) == "resume answered 200, not 206"
    assert "not 40" in str(plan.mismatch(_response(206, {"content-range": "bytes 0-99/100"}), 40))
    assert "total" in str(plan.mismatch(_response(206, {"content-range": "bytes 40-99/101"}), 40))
    changed = {"content-range": "bytes 40-99/100", "etag": '"other"'}
    assert plan.mismatch(_response(206, changed), 40) == "validator changed"
    assert (
        ResumePlan.for_response(
            _response(200, {"etag": '"e"', "accept-ranges": "bytes"}, method="HEAD")
        )
        is None
    )
