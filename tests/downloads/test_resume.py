"""End to end: resuming, verifying, surviving a restart and a full disk."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import hashlib
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from relay.downloads.model import Job, JobState
from relay.downloads.names import DataDir
from relay.downloads.store import JobStore
from relay.net.transports import PoolStats, make_transport
from relay.transfer import PartialFile
from tests.downloads.test_api import (
    file_sha256,
    get_job,
    marker,
    partials,
    post,
    wait_done,
    wait_for,
)
from tests.harness import RelayThread, relay_config, running_relay, wait_until
from tests.origin import ETAG_CHANGES_START, Origin, body_bytes, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


def requests_for(origin: Origin, tag: str) -> list[dict[str, str | None]]:
    return [
        {"range": r.header("range"), "if-range": r.header("if-range")}
        for r in origin.requests
        if tag in r.target
    ]


def test_download_resumes_with_range_after_the_upstream_drops(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin
) -> None:
    """A cut body is resumed with Range: bytes=N- and If-Range: <ETag>; the file is exact."""
    relay = make_relay(data_dir=str(tmp_path))
    tag = marker()
    size = 6 * MiB
    job = post(relay, path=f"/o/gen/{size}?drop_once={2 * MiB}&key={tag}&m={tag}").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "completed", done
    assert done["sha256"] == expected_sha256(size)
    assert done["attempts"] == 2
    first, second = requests_for(origin, tag)
    assert first["range"] is None
    assert second["range"] is not None
    offset = int(second["range"].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset <= 2 * MiB
    assert second["if-range"] == f'"gen-{size}-v1"'
    assert file_sha256(tmp_path / "files" / str(size)) == expected_sha256(size)


class CuttingTransport(httpx.AsyncBaseTransport):
    """Wraps relay's transport; the first len(cuts) GET bodies fail after cuts[i] bytes."""

    def __init__(self, inner: httpx.AsyncBaseTransport, cuts: list[int]) -> None:
        self.inner = inner
        self.cuts = list(cuts)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if not self.cuts or request.method != "GET":
            return response
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            response.status_code,
            headers=response.headers,
            stream=_CutStream(response.stream, self.cuts.pop(0)),
            request=request,
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self.inner.aclose()

    def pool_stats(self) -> PoolStats:
        stats: PoolStats = self.inner.pool_stats()  # type: ignore[attr-defined]
        return stats


class _CutStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, limit: int) -> None:
        self._inner = inner
        self._left = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            if len(chunk) >= self._left:
                yield chunk[: self._left]
                raise httpx.ReadError("injected: connection lost")
            self._left -= len(chunk)
            yield chunk

    async def aclose(self) -> None:
        await self._inner.aclose()


def test_download_256mib_cut_several_times_is_exact(origin: Origin, tmp_path: Path) -> None:
    """A 256 MiB body cut four times is resumed each time and published byte-exact."""
    size = 256 * MiB
    cuts = [40 * MiB, 50 * MiB + 1, 60 * MiB + 3, 30 * MiB + 7]
    config = relay_config(origin.url, data_dir=str(tmp_path), resume_attempts=1)
    transport = CuttingTransport(make_transport(config), cuts)
    tag = marker()
    with running_relay(config, transport=transport) as relay:
        job = post(relay, path=f"/o/gen/{size}?m={tag}", name="big").json()
        done = wait_done(relay, job["id"], timeout=60)
        assert done["state"] == "completed", done
        assert relay.settled()
    assert done["attempts"] == len(cuts) + 1
    offsets = [r["range"] for r in requests_for(origin, tag)]
    expected_offsets = [sum(cuts[: i + 1]) for i in range(len(cuts))]
    assert offsets == [None] + [f"bytes={n}-" for n in expected_offsets]
    assert done["sha256"] == expected_sha256(size)
    assert file_sha256(tmp_path / "files" / "big") == expected_sha256(size)


def test_download_restarts_from_zero_when_the_etag_changed(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin
) -> None:
    """If-Range fails on a changed object: the 200 replaces the partial, never appends to it."""
    relay = make_relay(data_dir=str(tmp_path))
    tag = marker()
    size = 3 * MiB
    job = post(relay, path=f"/o/gen/{size}?etag_changes=1&drop_once={MiB}&key={tag}&m={tag}").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "completed", done
    _, second = requests_for(origin, tag)
    assert second["range"] is not None
    # The validator of the first response, which the object no longer has.
    assert second["if-range"] is not None
    version = int(second["if-range"].strip('"').rpartition("-v")[2])
    assert version >= ETAG_CHANGES_START
    assert done["sha256"] == expected_sha256(size)
    assert done["bytes_done"] == size


def test_download_with_the_wrong_sha256_fails_and_publishes_nothing(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Right length, wrong bytes: failed with a mismatch, partial removed, no final file."""
    relay = make_relay(data_dir=str(tmp_path))
    job = post(relay, path=f"/o/gen/100000?m={marker()}", name="bad", sha256="0" * 64).json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert "sha256 mismatch" in done["error"]
    assert done["sha256"] is None
    assert partials(tmp_path) == []
    assert not (tmp_path / "files" / "bad").exists()


def test_download_with_the_wrong_size_fails_before_the_body(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """An expected size the upstream contradicts fails the job at the response head."""
    relay = make_relay(data_dir=str(tmp_path))
    job = post(relay, path=f"/o/gen/100000?m={marker()}", name="short", size=99999).json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert "size mismatch" in done["error"]
    assert not (tmp_path / "files" / "short").exists()


def test_download_from_an_upstream_lying_about_length_fails(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Content-Length larger than the body: never published, whatever the retries see."""
    relay = make_relay(data_dir=str(tmp_path))
    job = post(relay, path=f"/o/gen/100000?lie_length=200000&m={marker()}", name="liar").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert done["error"]
    assert partials(tmp_path) == []
    assert not (tmp_path / "files" / "liar").exists()


def test_download_gives_up_after_resume_attempts_without_progress(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin
) -> None:
    """An upstream that never gets further fails the job after 1 + resume_attempts requests."""
    relay = make_relay(data_dir=str(tmp_path), resume_attempts=2)
    tag = marker()
    job = post(relay, path=f"/o/gen/100000?close_after=0&m={tag}").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert "gave up after 3 attempts" in done["error"]
    assert done["attempts"] == 3
    assert len(requests_for(origin, tag)) == 3
    assert relay.settled()


def test_download_of_a_missing_object_fails_at_once(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A 4xx from the upstream is final: one attempt, the status in the error."""
    relay = make_relay(data_dir=str(tmp_path))
    job = post(relay, path="/o/status/404", name="missing").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert done["error"] == "upstream answered 404"
    assert done["attempts"] == 1


def _digest_path(header: str, body_sha256: str) -> str:
    value = f"{header}:sha-256=:{base64.b64encode(bytes.fromhex(body_sha256)).decode()}:"
    return f"/o/headers?set={quote(value, safe='')}&m={marker()}"


def test_download_checks_the_upstreams_repr_digest(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Repr-Digest is checked: a match completes, a mismatch fails and publishes nothing."""
    relay = make_relay(data_dir=str(tmp_path))
    body = b"ok\n"
    good = post(relay, path=_digest_path("Repr-Digest", hashlib.sha256(body).hexdigest()), name="g")
    bad = post(relay, path=_digest_path("Repr-Digest", "ab" * 32), name="b")
    assert wait_done(relay, good.json()["id"])["state"] == "completed"
    failed = wait_done(relay, bad.json()["id"])
    assert failed["state"] == "failed"
    assert "announced" in failed["error"]
    assert not (tmp_path / "files" / "b").exists()


@pytest.mark.leaves_resources  # stops the relay mid-download on purpose
def test_download_resumes_after_a_relay_restart(origin: Origin, tmp_path: Path) -> None:
    """Stopped mid-download, a new relay on the same data_dir re-hashes the partial and resumes."""
    config = relay_config(origin.url, data_dir=str(tmp_path))
    tag = marker()
    size = 2 * MiB
    baseline = origin.open_connections
    with running_relay(config) as relay:
        job = post(relay, path=f"/o/gen/{size}?slow=2m&m={tag}", name="survivor").json()
        wait_for(relay, job["id"], lambda j: j["bytes_done"] >= 256 * 1024)
    # Shutdown closed the upstream response and left the job running in the store.
    assert origin.wait_for(lambda o: o.open_connections <= baseline)
    assert stored_state(tmp_path, job["id"]) == "running"
    assert partials(tmp_path) == [f"{job['id']}.partial"]
    kept = (tmp_path / "partial" / f"{job['id']}.partial").stat().st_size
    assert kept > 0
    assert not (tmp_path / "files" / "survivor").exists()
    with running_relay(config) as relay:
        done = wait_done(relay, job["id"])
    assert done["state"] == "completed", done
    assert done["sha256"] == expected_sha256(size)
    first, *_, last = requests_for(origin, tag)
    assert first["range"] is None
    assert last["range"] == f"bytes={kept}-"
    assert last["if-range"] == f'"gen-{size}-v1"'
    assert file_sha256(tmp_path / "files" / "survivor") == expected_sha256(size)
    assert partials(tmp_path) == []


def stored_state(data_dir: Path, job_id: str) -> str:
    with contextlib.closing(sqlite3.connect(data_dir / "jobs.sqlite3")) as db:
        row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return str(row[0])


def test_download_published_before_a_crash_is_adopted_at_start(
    origin: Origin, tmp_path: Path
) -> None:
    """Killed between the rename and its record: the next start verifies and completes it."""
    data = DataDir(tmp_path)
    data.create()
    tag = marker()
    job = Job(
        id=marker(), path=f"/o/gen/5000?m={tag}", url=f"{origin.url}/gen/5000?m={tag}", name="late"
    )
    job.state, job.total, job.upstream_sha256 = JobState.RUNNING, 5000, expected_sha256(5000)

    async def seed() -> None:
        store = JobStore(data.store_path)
        await store.open()
        await store.save(job)
        await store.close()

    asyncio.run(seed())
    (data.files_dir / "late").write_bytes(body_bytes(5000))
    with running_relay(relay_config(origin.url, data_dir=str(tmp_path))) as relay:
        done = get_job(relay, job.id)
        assert done["state"] == "completed"
        assert done["sha256"] == expected_sha256(5000)
        assert httpx.get(f"{relay.url}/files/late").content == body_bytes(5000)
    assert not requests_for(origin, tag)


def test_download_restart_removes_partials_without_a_job(origin: Origin, tmp_path: Path) -> None:
    """At start, partial files no job owns are removed; other files are left alone."""
    config = relay_config(origin.url, data_dir=str(tmp_path))
    (tmp_path / "partial").mkdir(parents=True)
    orphan = tmp_path / "partial" / f"{marker()}.partial"
    orphan.write_bytes(b"left over")
    unrelated = tmp_path / "partial" / "README"
    unrelated.write_text("not relay's")
    with running_relay(config):
        pass
    assert not orphan.exists()
    assert unrelated.exists()


def test_download_disk_full_fails_cleanly_and_relay_keeps_serving(
    make_relay: Callable[..., RelayThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC while writing: failed with "disk full", partial removed, everything else works."""
    relay = make_relay(data_dir=str(tmp_path))
    original = PartialFile._write
    written = 0

    async def write_until_full(self: PartialFile, file: object, data: list[bytes]) -> int:
        nonlocal written
        size = sum(map(len, data))
        if written + size > 2_500_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        written += size
        return await original(self, file, data)  # type: ignore[arg-type]

    monkeypatch.setattr(PartialFile, "_write", write_until_full)
    job = post(relay, path=f"/o/gen/{4 * MiB}?m={marker()}", name="full").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert done["error"].startswith("disk full (ENOSPC)")
    assert done["attempts"] == 1  # a disk error is not retried
    assert written > 0  # it failed part-way, after some blocks were on disk
    assert partials(tmp_path) == []
    assert not (tmp_path / "files" / "full").exists()

    assert httpx.get(f"{relay.url}/healthz").status_code == 200
    relayed = httpx.get(f"{relay.url}/o/gen/{MiB}")
    assert hashlib.sha256(relayed.content).hexdigest() == expected_sha256(MiB)
    monkeypatch.undo()
    again = post(relay, path=f"/o/gen/{MiB}?m={marker()}", name="full").json()
    assert wait_done(relay, again["id"])["state"] == "completed"
    assert relay.settled()


def test_download_eio_is_reported_as_an_io_error(
    make_relay: Callable[..., RelayThread], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EIO while writing fails the job with "I/O error", partial removed."""
    relay = make_relay(data_dir=str(tmp_path))

    async def broken(self: PartialFile, file: object, data: list[bytes]) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(PartialFile, "_write", broken)
    job = post(relay, path=f"/o/gen/1000?m={marker()}", name="eio").json()
    done = wait_done(relay, job["id"])
    assert done["state"] == "failed"
    assert done["error"].startswith("I/O error (EIO)")
    assert partials(tmp_path) == []


def test_download_progress_reports_rate_and_eta_while_running(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """A running job has a positive smoothed rate and an ETA; a finished one has neither."""
    relay = make_relay(data_dir=str(tmp_path))
    job = post(relay, path=f"/o/gen/{2 * MiB}?slow=1m&m={marker()}", name="slowpoke").json()
    running = wait_for(relay, job["id"], lambda j: j["rate"] is not None and j["rate"] > 0)
    assert running["state"] == "running"
    assert running["total"] == 2 * MiB
    assert running["eta_seconds"] is not None
    assert running["eta_seconds"] >= 0
    done = wait_done(relay, job["id"])
    assert done["rate"] is None
    assert done["eta_seconds"] is None
    assert get_job(relay, job["id"])["state"] == "completed"
    assert wait_until(lambda: relay.connections_in_use() == 0)
