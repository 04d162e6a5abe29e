"""End to end: several mirrors per route, over loopback with real origins and clients.

Two `tests/origin.py` instances and a closed port play the mirrors; their faults sit in the
mirror's base URL (`/p/<params>/`): one refuses connections (the closed port), one answers
404, one 503, one dies mid-body, one serves other bytes under the same path (with the same
ETag: validators say nothing across mirrors). What each client got is checked by sha256, and
which mirror was asked by the origins' own request logs.
"""

from __future__ import annotations

import hashlib
import io
import logging
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from relay.cache.clock import ManualClock
from relay.config import Mirror, Route
from relay.fetch.errors import VerifyFailed
from relay.fetch.fetcher import FetchOptions, Reporter, fetch
from tests.downloads.test_api import file_sha256, post, wait_done
from tests.harness import CURL, RelayThread, curl, relay_config, sha256_stream, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
SHA_1M = expected_sha256(MiB)
DIFFERENT = "vkey=other"  # with set_version("other", 1): other bytes, the same ETag


@pytest.fixture(scope="module")
def second() -> Iterator[Origin]:
    with Origin() as server:
        server.set_version("other", 1)
        yield server


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def base(origin: Origin, params: str = "") -> str:
    return f"{origin.url}/p/{params or 'x=1'}/"


def route(*bases: str, **keys: object) -> Route:
    mirrors = tuple(Mirror(url=b) for b in bases)
    return Route(prefix="/m/", upstreams=mirrors, allow_private=True, **keys)  # type: ignore[arg-type]


def _resumed_at_most(range_header: str | None, cut: int) -> bool:
    """A continuation's Range asks from a byte at most where the first mirror cut the body
    (the bytes relay had when the cut was seen: the transport may drop what it buffered
    with the error), to the body's end."""
    start, _, end = (range_header or "").removeprefix("bytes=").partition("-")
    return start.isdigit() and 0 < int(start) <= cut and end == str(MiB - 1)


def asked(origin: Origin, tag: str) -> list[str | None]:
    """The Range of each request `origin` got for the test's `tag` (None: no Range)."""
    return [r.header("range") for r in origin.requests if tag in r.target]


def if_ranges(origin: Origin, tag: str) -> list[str | None]:
    return [r.header("if-range") for r in origin.requests if tag in r.target]


def get(url: str) -> tuple[bool, int, str, int]:
    """(completed cleanly, status, sha256, size) of a GET read to its end or its abort."""
    try:
        with httpx.Client(timeout=30) as client, client.stream("GET", url) as response:
            digest, size = sha256_stream(response)
            return True, response.status_code, digest, size
    except (httpx.RemoteProtocolError, httpx.ReadError):  # aborted: never a clean end
        return False, 0, "", 0


def blob(tag: str, digest: str = SHA_1M) -> str:
    """A digest-named path (an OCI blob): the digest pins the body's identity."""
    return f"/m/v2/lib/blobs/sha256:{digest}?t={tag}"


# ---- before the first byte ----------------------------------------------------------------------


def test_any_passes_a_refused_connection_and_a_404_on_to_the_next_mirror(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin
) -> None:
    tag = uuid.uuid4().hex
    relay = make_relay(
        routes=(route(closed_port_url(), base(origin, "answer=404"), base(second), failover="any"),)
    )
    completed, status, digest, size = get(f"{relay.url}/m/gen/{MiB}?t={tag}")
    assert (completed, status, digest, size) == (True, 200, SHA_1M, MiB)
    assert asked(origin, tag) == [None]
    assert asked(second, tag) == [None]
    assert relay.settled()


def test_not_found_policy_does_not_pass_a_503_on(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin
) -> None:
    """During the first mirror's outage a name never reaches the next one."""
    tag = uuid.uuid4().hex
    relay = make_relay(routes=(route(base(origin, "answer=503"), base(second)),))
    response = httpx.get(f"{relay.url}/m/gen/1024?t={tag}")
    assert response.status_code == 503
    assert asked(origin, tag) == [None]
    assert asked(second, tag) == []
    # A 404 does go on.
    relay404 = make_relay(routes=(route(base(origin, "answer=404"), base(second)),))
    response = httpx.get(f"{relay404.url}/m/gen/1024?t={tag}-404")
    assert response.status_code == 200
    assert asked(second, f"{tag}-404") == [None]


@pytest.mark.parametrize("refusal", [401, 403, 407])
def test_an_auth_refusal_never_falls_through(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin, refusal: int
) -> None:
    tag = uuid.uuid4().hex
    relay = make_relay(
        routes=(route(base(origin, f"answer={refusal}"), base(second), failover="any"),)
    )
    response = httpx.get(f"{relay.url}/m/gen/1024?t={tag}")
    assert response.status_code == refusal
    assert asked(second, tag) == []


def test_each_mirror_gets_its_own_credential_only(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin
) -> None:
    tag = uuid.uuid4().hex
    mirrors = (
        Mirror(url=base(origin, "answer=404")),
        Mirror(url=base(second), auth_env="B", credential="Bearer b-secret"),
    )
    first = Route(prefix="/m/", upstreams=mirrors, allow_private=True, credential="Bearer a-secret")
    relay = make_relay(routes=(first,))
    assert httpx.get(f"{relay.url}/m/gen/1024?t={tag}").status_code == 200
    a = [r.header("authorization") for r in origin.requests if tag in r.target]
    b = [r.header("authorization") for r in second.requests if tag in r.target]
    assert (a, b) == (["Bearer a-secret"], ["Bearer b-secret"])


# ---- passive health -----------------------------------------------------------------------------


def test_a_failing_mirror_rests_then_is_asked_again(
    origin: Origin, second: Origin, tmp_path: Path
) -> None:
    clock = ManualClock(now=time.time())
    config = relay_config(
        origin.url,
        routes=(route(base(origin, "answer=503"), base(second), failover="any", fail_timeout=30),),
    )
    relay = RelayThread(config, clock=clock).start()
    try:
        tag = uuid.uuid4().hex
        for i in range(2):
            assert httpx.get(f"{relay.url}/m/gen/1024?t={tag}&i={i}").status_code == 200
        assert asked(origin, tag) == [None]  # the second request skipped the resting mirror
        assert asked(second, tag) == [None, None]
        metrics = httpx.get(f"{relay.url}/metrics").text
        assert 'relay_upstream_mirror_up{mirror="1",route="/m/"} 0.0' in metrics
        assert 'relay_upstream_mirror_up{mirror="2",route="/m/"} 1.0' in metrics
        assert 'relay_upstream_mirror_failures_total{mirror="1",route="/m/"} 1.0' in metrics
        ready = httpx.get(f"{relay.url}/readyz")
        assert ready.status_code == 200
        assert "mirror /m/ 1 " in ready.text
        assert "resting for 30s after answered 503" in ready.text
        clock.advance(30)
        assert httpx.get(f"{relay.url}/m/gen/1024?t={tag}&i=2").status_code == 200
        assert asked(origin, tag) == [None, None]  # asked again after its rest
    finally:
        relay.stop()


def test_every_mirror_resting_answers_503_at_once_naming_the_cause(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin
) -> None:
    tag = uuid.uuid4().hex
    relay = make_relay(
        routes=(
            route(
                base(origin, "answer=503"),
                base(second, "answer=502"),
                failover="any",
                fail_timeout=600,
            ),
        )
    )
    assert httpx.get(f"{relay.url}/m/gen/1024?t={tag}").status_code == 502  # the last answer
    response = httpx.get(f"{relay.url}/m/gen/1024?t={tag}")
    assert response.status_code == 503
    assert "every mirror of /m/ is resting" in response.text
    assert "answered 503" in response.text
    assert "answered 502" in response.text
    assert int(response.headers["retry-after"]) > 0
    assert len(asked(origin, tag)) == len(asked(second, tag)) == 1


def test_a_hedged_request_takes_the_first_head_and_closes_the_other(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin
) -> None:
    tag = uuid.uuid4().hex
    gate = f"hedge-{tag}"
    origin.close_gate(gate)
    relay = make_relay(
        routes=(
            route(base(origin, f"hold={gate}"), base(second), failover="any", hedge_after=0.05),
        )
    )
    try:
        completed, status, digest, size = get(f"{relay.url}/m/gen/{MiB}?t={tag}")
        assert (completed, status, digest, size) == (True, 200, SHA_1M, MiB)
        assert asked(origin, tag) == [None]  # asked first, still holding its head
        assert asked(second, tag) == [None]
    finally:
        origin.open_gate(gate)
    assert relay.settled()


# ---- in the middle of a body --------------------------------------------------------------------


def switching_relay(
    make_relay: Callable[..., RelayThread],
    origin: Origin,
    second: Origin,
    tmp_path: Path,
    *,
    cached: bool,
    other_bytes: bool,
) -> RelayThread:
    """A relay whose first mirror dies 300000 bytes into every body and whose second serves
    the same bytes, or other ones (with the same ETag); with the cache on or off."""
    cache = {"cache_dir": str(tmp_path / "cache"), "cache_max_bytes": 64 * MiB} if cached else {}
    return make_relay(
        routes=(
            route(
                base(origin, f"gen={MiB}&close_after=300000"),
                base(second, f"gen={MiB}&{DIFFERENT}" if other_bytes else f"gen={MiB}"),
                failover="any",
            ),
        ),
        **cache,
    )


@pytest.mark.parametrize("cached", [False, True], ids=["relayed", "cache-fill"])
def test_a_pinned_body_continues_from_the_next_mirror_byte_exact(
    make_relay: Callable[..., RelayThread],
    origin: Origin,
    second: Origin,
    tmp_path: Path,
    cached: bool,
) -> None:
    tag = uuid.uuid4().hex
    relay = switching_relay(make_relay, origin, second, tmp_path, cached=cached, other_bytes=False)
    url = f"{relay.url}{blob(tag)}"
    if CURL is not None:
        assert curl(url) == (0, SHA_1M, MiB)
    else:  # pragma: no cover - curl is in the test image
        assert get(url) == (True, 200, SHA_1M, MiB)
    assert asked(origin, tag) == [None]
    (resumed,) = asked(second, tag)
    assert _resumed_at_most(resumed, 300000)
    assert if_ranges(second, tag) == [None]  # another mirror's validator means nothing
    assert relay.settled()
    if cached:  # stored under the route's key: a hit, nothing asked again
        assert httpx.get(url).headers["cache-status"].startswith("relay; hit")
        assert len(asked(origin, tag)) == len(asked(second, tag)) == 1


@pytest.mark.parametrize("cached", [False, True], ids=["relayed", "cache-fill"])
def test_a_pinned_body_continued_with_other_bytes_is_aborted(
    make_relay: Callable[..., RelayThread],
    origin: Origin,
    second: Origin,
    tmp_path: Path,
    cached: bool,
) -> None:
    """The mirror serves other bytes under the same path and the same ETag: the digest,
    checked before the last byte, aborts the client transfer (and a fill stores nothing)."""
    tag = uuid.uuid4().hex
    relay = switching_relay(make_relay, origin, second, tmp_path, cached=cached, other_bytes=True)
    url = f"{relay.url}{blob(tag)}"
    for attempt in (1, 2):  # nothing was stored: asked again, and aborted again
        if CURL is not None:
            code, _, size = curl(url)
            assert code in (18, 56)
            assert size < MiB
        else:  # pragma: no cover
            assert not get(url)[0]
        assert len(asked(origin, tag)) == attempt
        assert _resumed_at_most(asked(second, tag)[-1], 300000)
        assert relay.settled()


def test_an_unpinned_body_resumes_from_its_own_mirror_only(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin
) -> None:
    """No digest known: the other mirror (with the same ETag, other bytes) is never asked."""
    tag = uuid.uuid4().hex
    relay = make_relay(
        routes=(
            route(
                base(origin, f"drop_once=300000&key={tag}"),
                base(second, DIFFERENT),
                failover="any",
            ),
        )
    )
    assert get(f"{relay.url}/m/gen/{MiB}?t={tag}") == (True, 200, SHA_1M, MiB)
    first, resumed = asked(origin, tag)
    assert first is None
    assert _resumed_at_most(resumed, 300000)
    assert asked(second, tag) == []
    assert relay.settled()


# ---- the cache ----------------------------------------------------------------------------------


def test_the_cache_key_does_not_depend_on_the_mirror_that_answered(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin, tmp_path: Path
) -> None:
    """Filled from the second mirror (the first had no such file), then a hit for every
    client, whichever mirror would answer now."""
    tag = uuid.uuid4().hex
    relay = make_relay(
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=64 * MiB,
        routes=(route(base(origin, "answer=404"), base(second)),),
    )
    url = f"{relay.url}/m/gen/65536?t={tag}"
    first = httpx.get(url)
    assert first.status_code == 200
    assert relay.settled()
    second_answer = httpx.get(url)
    assert second_answer.headers["cache-status"].startswith("relay; hit")
    assert second_answer.content == first.content
    assert len(asked(origin, tag)) == len(asked(second, tag)) == 1


@pytest.mark.parametrize("cached", [False, True], ids=["relayed", "cached"])
def test_the_access_line_names_the_mirror_that_answered(
    make_relay: Callable[..., RelayThread],
    origin: Origin,
    second: Origin,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    cached: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="relay.access")
    cache = {"cache_dir": str(tmp_path / "cache"), "cache_max_bytes": 64 * MiB} if cached else {}
    relay = make_relay(routes=(route(base(origin, "answer=404"), base(second)),), **cache)
    lone = make_relay(routes=(Route(prefix="/m/", upstream=base(second), allow_private=True),))
    for server, expected in ((relay, 2), (lone, None)):
        request_id = f"mirror-{uuid.uuid4().hex}"
        answer = httpx.get(
            f"{server.url}/m/gen/4096?t={request_id}", headers={"x-request-id": request_id}
        )
        assert answer.status_code == 200

        def lines(request_id: str = request_id) -> list[object]:
            return [
                r
                for r in caplog.records
                if r.name == "relay.access" and getattr(r, "request_id", None) == request_id
            ]

        assert wait_until(lambda: len(lines()) == 1)
        assert vars(lines()[0])["upstream_mirror"] == expected  # its place in upstreams


# ---- downloads to disk and relay fetch ----------------------------------------------------------


@pytest.mark.parametrize("other_bytes", [False, True], ids=["same", "different"])
def test_a_download_continues_from_the_next_mirror_with_its_expected_sha256(
    make_relay: Callable[..., RelayThread],
    origin: Origin,
    second: Origin,
    tmp_path: Path,
    other_bytes: bool,
) -> None:
    tag = uuid.uuid4().hex
    size = 2 * MiB
    relay = make_relay(
        data_dir=str(tmp_path),
        routes=(
            route(
                base(origin, f"close_after={MiB}"),
                base(second, DIFFERENT if other_bytes else ""),
                failover="any",
            ),
        ),
    )
    sha = expected_sha256(size)
    job = post(relay, path=f"/m/gen/{size}?t={tag}", name="f", sha256=sha).json()
    done = wait_done(relay, job["id"])
    assert asked(origin, tag)[0] is None
    assert asked(second, tag)[0] == f"bytes={MiB}-"
    if other_bytes:
        assert done["state"] == "failed", done
        assert not (tmp_path / "files" / "f").exists()
    else:
        assert done["state"] == "completed", done
        assert file_sha256(tmp_path / "files" / "f") == sha
    assert relay.settled()


@pytest.mark.parametrize("other_bytes", [False, True], ids=["same", "different"])
def test_relay_fetch_continues_from_a_mirror_url_with_sha256(
    origin: Origin, second: Origin, tmp_path: Path, other_bytes: bool
) -> None:
    tag = uuid.uuid4().hex
    out = tmp_path / "file.bin"
    first = f"{base(origin, f'close_after={MiB}')}gen/{2 * MiB}?t={tag}"
    mirror = f"{base(second, DIFFERENT if other_bytes else '')}gen/{2 * MiB}?t={tag}"
    sha = expected_sha256(2 * MiB)
    options = FetchOptions(
        url=first, output=str(out), sha256=sha, retry_delay=0, mirrors=(mirror,), failover="any"
    )
    if other_bytes:
        with pytest.raises(VerifyFailed):
            fetch(options, Reporter(io.StringIO()))
        assert not out.exists()
    else:
        assert fetch(options, Reporter(io.StringIO())) == sha
        assert file_sha256(out) == sha
    assert asked(second, tag) == [f"bytes={MiB}-"]
    assert if_ranges(second, tag) == [None]


def test_relay_fetch_mirror_on_not_found(origin: Origin, second: Origin, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex
    out = tmp_path / "f.bin"
    options = FetchOptions(
        url=f"{base(origin, 'answer=404')}gen/4096?t={tag}",
        output=str(out),
        mirrors=(f"{base(second)}gen/4096?t={tag}",),
    )
    assert fetch(options, Reporter(io.StringIO())) == expected_sha256(4096)
    assert asked(second, tag) == [None]


def test_a_slice_fill_goes_on_to_the_next_mirror(
    make_relay: Callable[..., RelayThread], origin: Origin, second: Origin, tmp_path: Path
) -> None:
    """A range of an object not stored is fetched as an aligned slice: from the next mirror
    when the first has no such file."""
    tag = uuid.uuid4().hex
    relay = make_relay(
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=64 * MiB,
        cache_slice_bytes=65536,
        routes=(route(base(origin, "answer=404"), base(second)),),
    )
    response = httpx.get(
        f"{relay.url}/m/gen/{MiB}?t={tag}", headers={"Range": "bytes=100000-100099"}
    )
    assert response.status_code == 206
    assert hashlib.sha256(response.content).hexdigest() == expected_sha256(MiB, 100000, 100100)
    assert asked(origin, tag) == ["bytes=65536-131071"]
    assert asked(second, tag) == ["bytes=65536-131071"]
    assert relay.settled()
