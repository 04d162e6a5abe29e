"""End to end: one continuation rule for streams, download jobs and `relay fetch`.

A continuation must be a 206 of the same representation (same validator, same total) at the
offset; anything else is never joined to the bytes already had. A resume request that itself
fails is one more attempt within `resume_attempts`.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from relay.fetch.fetcher import FetchOptions, Reporter, fetch
from tests.downloads.test_api import file_sha256, marker, post, wait_done
from tests.harness import CURL, RelayThread, curl, sha256_stream
from tests.origin import ETAG_CHANGES_START, Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
# An upstream that ignores If-Range: a changed object is answered with a 206 of the new version.
NEW_VERSION_206 = "etag_changes=1&ignore_if_range=1"
# The same, with no validator at all on the 206.
BARE_206 = "etag_changes=1&ignore_if_range=1&bare_206=1"


def ranges_for(origin: Origin, tag: str) -> list[str | None]:
    return [r.header("range") for r in origin.requests if tag in r.target]


def stream_outcome(url: str) -> tuple[bool, str, int]:
    """(completed cleanly, sha256, size) of a GET read to its end or its abort."""
    try:
        with httpx.Client(timeout=30) as client, client.stream("GET", url) as response:
            digest, size = sha256_stream(response)
    except httpx.RemoteProtocolError:
        return False, "", 0
    return True, digest, size


# ---- streams ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [NEW_VERSION_206, BARE_206], ids=["new-etag", "no-validator"])
def test_stream_resume_answered_by_another_version_is_aborted(
    relay: RelayThread, origin: Origin, fault: str
) -> None:
    """A 206 with a new ETag, or none, after the object changed: the client transfer aborts."""
    tag = uuid.uuid4().hex
    url = f"{relay.url}/o/gen/{MiB}?{fault}&drop_once=300000&key={tag}"
    if CURL is not None:
        code, _, size = curl(url)
        assert code == 18  # curl: partial file, never a clean end
        assert size == 300000
    else:  # pragma: no cover - curl is in the test image
        completed, _, _ = stream_outcome(url)
        assert not completed
    assert ranges_for(origin, tag) == [None, f"bytes=300000-{MiB - 1}"]
    assert relay.settled()


def test_stream_resume_whose_request_times_out_once_is_retried(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    """The resume request stalls before its headers once: a second resume completes the body."""
    relay = make_relay(read_timeout=0.5, resume_attempts=3)
    tag = uuid.uuid4().hex
    url = f"{relay.url}/o/gen/{MiB}?drop_once=300000&stall_resume_once=1&key={tag}"
    completed, digest, size = stream_outcome(url)
    assert (completed, digest, size) == (True, expected_sha256(MiB), MiB)
    resume = f"bytes=300000-{MiB - 1}"
    assert ranges_for(origin, tag) == [None, resume, resume]
    assert relay.settled()


def test_stream_resume_request_failures_count_against_resume_attempts(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    """With resume_attempts=1, the body's cut and the resume's timeout spend the budget."""
    relay = make_relay(read_timeout=0.5, resume_attempts=1)
    tag = uuid.uuid4().hex
    url = f"{relay.url}/o/gen/{MiB}?drop_once=300000&stall_resume_once=1&key={tag}"
    completed, _, _ = stream_outcome(url)
    assert not completed
    assert ranges_for(origin, tag) == [None, f"bytes=300000-{MiB - 1}"]
    assert relay.settled()


# ---- download jobs ------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [NEW_VERSION_206, BARE_206], ids=["new-etag", "no-validator"])
def test_download_resume_answered_by_another_version_restarts_from_zero(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin, fault: str
) -> None:
    """The 206 of another version is never appended: the job starts again from byte 0."""
    relay = make_relay(data_dir=str(tmp_path))
    tag = marker()
    size = 3 * MiB
    job = post(relay, path=f"/o/gen/{size}?{fault}&drop_once={MiB}&key={tag}", name="v").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "completed", done
    ranges = ranges_for(origin, tag)
    assert len(ranges) == 3
    assert ranges[0] is None
    assert ranges[1] is not None
    assert ranges[1].startswith("bytes=")
    assert ranges[2] is None  # started again from zero
    assert int(done["attempts"]) == 3
    # The published file is the last version, whole (this origin's versions share bytes).
    assert done["bytes_done"] == size
    assert done["sha256"] == expected_sha256(size)
    assert file_sha256(tmp_path / "files" / "v") == expected_sha256(size)
    assert relay.settled()


def test_download_resume_request_timing_out_is_retried(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin
) -> None:
    """A resume request that times out before its headers is one more attempt, then resumed."""
    relay = make_relay(data_dir=str(tmp_path), read_timeout=0.5)
    tag = marker()
    size = 2 * MiB
    path = f"/o/gen/{size}?drop_once={MiB}&stall_resume_once=1&key={tag}"
    done = wait_done(relay, post(relay, path=path, name="t").json()["id"])
    assert done["state"] == "completed", done
    ranges = ranges_for(origin, tag)
    assert len(ranges) == 3
    assert ranges[0] is None
    assert ranges[1] == ranges[2]
    assert ranges[1] is not None
    assert done["sha256"] == expected_sha256(size)


# ---- relay fetch --------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [NEW_VERSION_206, BARE_206], ids=["new-etag", "no-validator"])
def test_fetch_resume_answered_by_another_version_starts_over(
    origin: Origin, tmp_path: Path, fault: str
) -> None:
    """relay fetch: a 206 of another version after a drop is discarded; FILE is one version."""
    tag = uuid.uuid4().hex
    out = tmp_path / "file.bin"
    stream = io.StringIO()
    url = origin.url_for(f"/gen/{4 * MiB}", key=tag) + f"&{fault}&drop_once=1000000"
    options = FetchOptions(url=url, output=str(out), retry_delay=0)
    digest = fetch(options, Reporter(stream))
    assert digest == expected_sha256(4 * MiB)
    assert file_sha256(out) == digest
    assert ranges_for(origin, tag) == [None, "bytes=1000000-", None]
    assert "file changed" in stream.getvalue()
    assert "starting over" in stream.getvalue()


def test_new_version_206_carries_a_new_etag(origin: Origin) -> None:
    """The fault these tests rely on: the origin's 206 really is another version."""
    url = f"{origin.url}/gen/1000?{NEW_VERSION_206}"
    first = httpx.get(url)
    second = httpx.get(url, headers={"Range": "bytes=10-", "If-Range": first.headers["etag"]})
    assert second.status_code == 206
    assert second.headers["etag"] != first.headers["etag"]
    assert int(second.headers["etag"].strip('"').rpartition("-v")[2]) >= ETAG_CHANGES_START
