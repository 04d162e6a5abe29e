"""The partial file: exclusive create, lock, hash while writing, verified publish."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from relay.transfer.errors import DiskError, FileInUse, TargetExists, VerificationFailed
from relay.transfer.partial import WRITE_BLOCK, PartialFile

BODY = bytes(range(256)) * 40  # 10240 bytes
BODY_SHA = hashlib.sha256(BODY).hexdigest()


async def test_writer_hashes_while_writing_and_publishes_atomically(tmp_path: Path) -> None:
    """The digest is ready at the last byte; the final name appears only after verification."""
    partial = await PartialFile.open(tmp_path / "x.partial")
    await partial.write(BODY[:100])
    await partial.write(BODY[100:])
    assert partial.hexdigest() == BODY_SHA
    target = tmp_path / "final"
    digest = await partial.publish(
        target, expected_size=len(BODY), expected_sha256=BODY_SHA, upstream_sha256=BODY_SHA
    )
    assert digest == BODY_SHA
    assert target.read_bytes() == BODY
    assert not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize(
    ("size", "sha", "announced", "message"),
    [
        (len(BODY), "00" * 32, None, "sha256 mismatch: expected"),
        (len(BODY), None, "00" * 32, "announced"),
        (len(BODY) + 1, None, None, "size mismatch"),
    ],
)
async def test_writer_never_publishes_what_does_not_verify(
    tmp_path: Path, size: int, sha: str | None, announced: str | None, message: str
) -> None:
    """Wrong size or digest: VerificationFailed, the final name never exists."""
    partial = await PartialFile.open(tmp_path / "x.partial")
    await partial.write(BODY)
    with pytest.raises(VerificationFailed, match=message):
        await partial.publish(
            tmp_path / "final", expected_size=size, expected_sha256=sha, upstream_sha256=announced
        )
    await partial.discard()
    assert list(tmp_path.iterdir()) == []


async def test_writer_resume_rehashes_what_is_on_disk(tmp_path: Path) -> None:
    """Opening an existing partial re-hashes it and appends; restart() starts from byte 0."""
    path = tmp_path / "x.partial"
    path.write_bytes(BODY[:4000])
    partial = await PartialFile.open(path)
    assert partial.size == 4000
    await partial.write(BODY[4000:])
    assert partial.hexdigest() == BODY_SHA
    await partial.restart()
    assert partial.size == 0
    await partial.write(b"abc")
    await partial.close()
    assert path.read_bytes() == b"abc"


async def test_writer_does_not_overwrite_a_file_that_appeared(tmp_path: Path) -> None:
    """os.replace never clobbers a final name that exists by the time of publishing."""
    target = tmp_path / "final"
    target.write_bytes(b"someone else's")
    partial = await PartialFile.open(tmp_path / "x.partial")
    await partial.write(BODY)
    with pytest.raises(TargetExists, match="appeared"):
        await partial.publish(
            target, expected_size=None, expected_sha256=None, upstream_sha256=None
        )
    assert target.read_bytes() == b"someone else's"
    await partial.discard()


async def test_writer_disk_errors_name_the_cause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed block write is reported by the next call as a DiskError saying what failed."""

    async def full(self: PartialFile, file: object, data: list[bytes]) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PartialFile, "_write", full)
    partial = await PartialFile.open(tmp_path / "x.partial")
    try:
        await partial.write(b"x" * WRITE_BLOCK)  # the write starts in a thread, and fails
        with pytest.raises(DiskError, match=r"^disk full \(ENOSPC\) writing x.partial$"):
            await partial.write(b"x" * WRITE_BLOCK)
    finally:
        await partial.discard()


async def test_writer_publish_reports_a_failed_last_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last block's write error stops publish: nothing is moved into place."""

    async def broken(self: PartialFile, file: object, data: list[bytes]) -> int:
        raise OSError(errno.EIO, "Input/output error")

    partial = await PartialFile.open(tmp_path / "x.partial")
    await partial.write(BODY)
    monkeypatch.setattr(PartialFile, "_write", broken)
    try:
        with pytest.raises(DiskError, match="I/O error"):
            await partial.publish(
                tmp_path / "final", expected_size=None, expected_sha256=None, upstream_sha256=None
            )
    finally:
        await partial.discard()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("write_behind", [True, False], ids=["write-behind", "in-place"])
async def test_both_ways_of_writing_give_the_same_file(tmp_path: Path, write_behind: bool) -> None:
    """Blocks in a worker thread or each chunk in place: the same bytes, the same digest."""
    partial = await PartialFile.open(tmp_path / "x.partial", write_behind=write_behind)
    chunks = [BODY] * 300  # 3 MiB: several blocks
    for chunk in chunks:
        await partial.write(chunk)
    digest = await partial.publish(tmp_path / "final")
    whole = b"".join(chunks)
    assert digest == hashlib.sha256(whole).hexdigest()
    assert (tmp_path / "final").read_bytes() == whole


async def test_in_place_writes_report_a_disk_error_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed in-place write raises DiskError from that write and is not hashed."""
    partial = await PartialFile.open(tmp_path / "x.partial", write_behind=False)
    try:
        await partial.write(b"kept")

        def full(data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(partial._require_open(), "write", full)
        with pytest.raises(DiskError, match=r"^disk full \(ENOSPC\) writing x.partial$"):
            await partial.write(b"lost")
        assert partial.size == 4
    finally:
        monkeypatch.undo()
        await partial.discard()


async def test_opening_without_resume_empties_what_is_there(tmp_path: Path) -> None:
    """resume=False: the bytes found are reported and dropped; the file starts at byte 0."""
    path = tmp_path / "x.partial"
    path.write_bytes(BODY)
    partial = await PartialFile.open(path, resume=False)
    assert (partial.found, partial.size) == (len(BODY), 0)
    await partial.write(b"abc")
    await partial.close()
    assert path.read_bytes() == b"abc"


async def test_a_partial_file_open_elsewhere_is_in_use(tmp_path: Path) -> None:
    """Two holders of one partial file would interleave their bytes: the second is refused."""
    path = tmp_path / "x.partial"
    first = await PartialFile.open(path)
    try:
        with pytest.raises(FileInUse, match="in use"):
            await PartialFile.open(path)
    finally:
        await first.close()
    second = await PartialFile.open(path)
    await second.close()


async def test_publish_replaces_the_target_only_when_told(tmp_path: Path) -> None:
    """replace=True is the one way over an existing name (relay fetch --force)."""
    target = tmp_path / "final"
    target.write_bytes(b"old")
    partial = await PartialFile.open(tmp_path / "x.partial")
    await partial.write(BODY)
    assert await partial.publish(target, replace=True) == BODY_SHA
    assert target.read_bytes() == BODY


async def test_closing_without_flush_keeps_only_what_reached_the_disk(tmp_path: Path) -> None:
    """flush=False drops the chunks not yet handed to a write; what is kept has no gap."""
    path = tmp_path / "x.partial"
    partial = await PartialFile.open(path)
    await partial.write(b"x" * WRITE_BLOCK)  # handed to a write
    await partial.write(b"y" * 1000)  # still gathered
    await partial.close(flush=False)
    assert path.read_bytes() == b"x" * WRITE_BLOCK
