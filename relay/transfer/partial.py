"""The partial file: created exclusively, locked, hashed as written, published once verified.

The life of a partial file (`relay.disk` does the blocking work, in a worker thread):

- created with O_CREAT|O_EXCL|O_NOFOLLOW: a fresh start never writes into a file someone else
  opened, nor through a planted symlink. An existing one (a resume, in this process or after a
  restart) is taken over and re-hashed, or emptied when the caller will not resume it;
- locked (`flock`) while open: a second process that opens it gets `FileInUse`;
- every chunk goes to the SHA-256 as it is written (bandersnatch's way), so the digest is
  ready when the last byte lands; chunks reach the disk `WRITE_BLOCK` bytes at a time, in one
  gathered write (`writev`, no copy) in a worker thread while the next ones are received (a
  network read is often a few KiB: one thread hop per read cost far more CPU, and waiting for
  each write idled the transfer). A write error is reported by the next `write`, `publish`
  or `close`. A program with nothing else to run writes each chunk in place instead
  (`write_behind=False`);
- `restart` empties it durably (before any new record can describe it);
- `publish` checks size and digests (`verify`), then gives it its final name through
  `relay.disk.publish` (never replacing a file) or, when the caller says so,
  `relay.disk.replace`. The final name never exists before the bytes were verified (apt's
  "Hash Sum mismatch" is never published); a crash leaves either the partial file or the
  complete final file, never a torn one.

Disk errors (ENOSPC, EIO, ...) come out as `DiskError` naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from relay import disk
from relay.transfer.errors import DiskError, FileInUse, TargetExists, VerificationFailed

logger = logging.getLogger(__name__)

WRITE_BLOCK = 1024 * 1024
"""Bytes gathered per write. A transfer holds at most two blocks: one being written, one being
filled."""


class Sink(Protocol):
    """Where a transfer's bytes go: a `PartialFile`, or a stream (which cannot start over)."""

    @property
    def size(self) -> int:
        """Bytes accepted so far (the offset to resume from)."""
        ...

    def hexdigest(self) -> str: ...
    async def write(self, data: bytes) -> None: ...
    async def restart(self) -> None:
        """Drop everything written: the next byte is byte 0 (TransferError if impossible)."""
        ...


class PartialFile:
    def __init__(
        self, path: Path, file: BinaryIO, written: disk.Sha256, found: int, *, write_behind: bool
    ) -> None:
        self.path = path
        self.found = found
        """Bytes the file held when it was opened (0 when it was created)."""
        self._file: BinaryIO | None = file
        self._written = written
        self._buffer: list[bytes] = []  # chunks received, not yet handed to a write
        self._buffered = 0
        self._pending: asyncio.Future[int] | None = None
        self._write_behind = write_behind

    @classmethod
    async def open(
        cls, path: Path, *, resume: bool = True, write_behind: bool = True
    ) -> PartialFile:
        """Create the partial file at `path`, or take over the one there: re-hashed to append
        to it (`resume`), else emptied. FileInUse when another process holds it.

        `write_behind=False` writes each chunk as it arrives, on the caller's thread (blocking
        its event loop): for a program with nothing else to run (`relay fetch`) the cheapest
        way, as the chunk is still in the CPU's cache and no thread is woken. A server keeps
        the default, so a slow disk never stalls its loop."""
        opening = asyncio.ensure_future(asyncio.to_thread(_take, path, resume))
        try:
            with disk_errors(f"opening {path.name}"):
                file, written, found = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_taken)  # the thread may still be hashing
            raise
        if resume and written.size:
            logger.info("resuming %s: re-hashed %d bytes already on disk", path.name, written.size)
        return cls(path, file, written, found, write_behind=write_behind)

    @property
    def size(self) -> int:
        """Bytes accepted so far (the offset to resume from)."""
        return self._written.size

    @property
    def closed(self) -> bool:
        """Closed, published or discarded."""
        return self._file is None

    def hexdigest(self) -> str:
        return self._written.hexdigest

    async def write(self, data: bytes) -> None:
        """Append `data` (kept by reference until written: never modify it afterwards)."""
        file = self._require_open()
        if not self._write_behind:
            try:  # not `disk_errors`: a context manager per chunk is measurable here
                file.write(data)
            except OSError as exc:
                raise DiskError.from_os_error(exc, f"writing {self.path.name}") from exc
            self._written.update(data)  # after the write: a failed one is not counted
            return
        self._written.update(data)
        self._buffer.append(data)
        self._buffered += len(data)
        if self._buffered >= WRITE_BLOCK:
            await self._flush_buffer()

    async def _flush_buffer(self) -> None:
        """Start writing the gathered chunks, once the previous write is done."""
        file = self._require_open()
        await self._wait_for_write()
        if self._buffer:
            block, self._buffer, self._buffered = self._buffer, [], 0
            self._pending = asyncio.ensure_future(self._write(file, block))

    async def _wait_for_write(self) -> None:
        """Wait for the write in progress; raise DiskError if it failed."""
        pending = self._pending
        if pending is None:
            return
        try:
            # Shielded: a cancelled transfer leaves the write running; `close` waits for it,
            # so writes never overlap and the file is never closed under one.
            with disk_errors(f"writing {self.path.name}"):
                await asyncio.shield(pending)
        finally:
            if pending.done():
                self._pending = None

    def _write(self, file: BinaryIO, chunks: list[bytes]) -> Awaitable[int]:
        """The one call that puts bytes on disk (a seam for tests that inject disk faults).

        One gathered write of the chunks as received (no copy into a block), handed to a
        worker thread at once, not when the event loop next runs: a caller that keeps the
        loop busy (`relay fetch` reads its socket in place) still overlaps writes and reads."""
        return asyncio.get_running_loop().run_in_executor(None, disk.write_chunks, file, chunks)

    async def restart(self) -> None:
        """Drop everything written so far, durably: the next byte written is byte 0."""
        file = self._require_open()
        self._buffer, self._buffered = [], 0
        await self._settle()
        with disk_errors(f"truncating {self.path.name}"):
            await asyncio.to_thread(disk.truncate, file)
        self._written.reset()

    async def publish(
        self,
        target: Path,
        *,
        expected_size: int | None = None,
        expected_sha256: str | None = None,
        upstream_sha256: str | None = None,
        replace: bool = False,
    ) -> str:
        """Verify, then give the file its final name; returns the digest. The partial file is
        consumed (closed; its name is gone). TargetExists when `target` exists, unless
        `replace` allows replacing it."""
        digest = self.hexdigest()
        verify(
            self.size,
            digest,
            expected_size=expected_size,
            expected_sha256=expected_sha256,
            upstream_sha256=upstream_sha256,
        )
        file = self._require_open()
        with disk_errors(f"publishing {target.name}"):
            await self._flush_buffer()
            await self._wait_for_write()
            await asyncio.to_thread(file.flush)
            try:
                move = disk.replace if replace else disk.publish
                await asyncio.to_thread(move, self.path, target)
            except FileExistsError:
                # Names are reserved or checked before a transfer starts; this is a last line
                # of defence.
                raise TargetExists(
                    f"{target.name} appeared while downloading; not overwritten"
                ) from None
        await self.close()  # the lock is held until the final name exists
        return digest

    async def close(self, *, flush: bool = True) -> None:
        """Close the file, keeping it on disk (to resume later; re-hashed then).

        `flush=False` drops the bytes not yet handed to a write: what is kept is then exactly
        what earlier writes put on disk, whatever state an interruption left this object in
        (writes are handed over one block after another, so no gap can follow)."""
        if self._file is None:
            return
        if flush:
            with contextlib.suppress(DiskError):  # what did not reach the disk is fetched again
                await self._flush_buffer()
        self._buffer, self._buffered = [], 0
        await self._settle()
        file, self._file = self._file, None
        with contextlib.suppress(OSError):
            await asyncio.shield(asyncio.to_thread(file.close))

    async def discard(self) -> None:
        """Close and remove the partial file."""
        self._buffer, self._buffered = [], 0
        await self.close()
        await asyncio.to_thread(disk.remove_quietly, self.path)

    async def _settle(self) -> None:
        """Wait for the write in progress, whatever its outcome (the bytes are moot now)."""
        pending = self._pending
        if pending is not None:
            await asyncio.wait([pending])
            self._pending = None
            if not pending.cancelled():
                pending.exception()  # retrieved, so asyncio does not log it

    def _require_open(self) -> BinaryIO:
        if self._file is None:
            raise RuntimeError(f"{self.path.name} is closed")
        return self._file


def verify(
    size: int,
    digest: str,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    upstream_sha256: str | None = None,
) -> None:
    """VerificationFailed unless the bytes have the expected size and digests."""
    if expected_size is not None and size != expected_size:
        raise VerificationFailed(f"size mismatch: received {size} bytes, expected {expected_size}")
    if expected_sha256 is not None and digest != expected_sha256:
        raise VerificationFailed(f"sha256 mismatch: expected {expected_sha256}, got {digest}")
    if upstream_sha256 is not None and digest != upstream_sha256:
        raise VerificationFailed(
            f"sha256 mismatch: the upstream announced {upstream_sha256}, got {digest}"
        )


@contextlib.contextmanager
def disk_errors(doing: str) -> Iterator[None]:
    """The one translation of OSError into DiskError (naming the cause) for partial files."""
    try:
        yield
    except OSError as exc:
        raise DiskError.from_os_error(exc, doing) from exc


def _take(path: Path, resume: bool) -> tuple[BinaryIO, disk.Sha256, int]:
    """Open (creating, or taking over) and lock the partial file; hash or empty what it holds."""
    file: BinaryIO
    try:
        file = disk.open_exclusive(path)
        existing = False
    except FileExistsError:
        file = os.fdopen(disk.no_follow(str(path), os.O_RDWR), "r+b")
        existing = True
    try:
        if not disk.try_lock(file.fileno()):
            raise FileInUse(f"{path} is in use by another process")
        written = disk.Sha256()
        found = os.fstat(file.fileno()).st_size if existing else 0
        if found and resume:
            written.update_from(file)
            file.seek(0, os.SEEK_END)
        elif found:
            disk.truncate(file)
    except BaseException:
        file.close()
        raise
    return file, written, found


def _close_taken(opening: asyncio.Future[tuple[BinaryIO, disk.Sha256, int]]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result()[0].close()


__all__ = ["WRITE_BLOCK", "PartialFile", "Sink", "disk_errors", "verify"]
