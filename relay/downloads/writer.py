"""The partial file: written exclusively, hashed as written, published only once verified.

The life of `partial/{id}.partial`:

- created with O_CREAT|O_EXCL (mode "xb"): a fresh start never writes into a file someone
  else opened; a resume (same process or after a restart) re-hashes what is on disk, then
  appends;
- every chunk goes to the SHA-256 as it is written (bandersnatch's way), so the digest is
  ready when the last byte lands; chunks reach the disk in `WRITE_BLOCK` pieces, each
  written in a worker thread while the next one is received (a network read is often a few
  KiB: one thread hop per read cost far more CPU, and waiting for each write idled the
  download). A write error is reported by the next write, `publish` or `close` call;
- `publish` checks size and digest, then `relay.disk.publish`es it into `files/{name}`
  (fsync, no overwrite, directory fsync). The final name never exists before the bytes were
  verified (apt's "Hash Sum mismatch" is never published), and a crash leaves either the
  partial file or the complete final file, never a torn one.

Disk errors (ENOSPC, EIO, ...) come out as `DiskError` naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from relay import disk
from relay.downloads.errors import DiskError, VerificationFailed

logger = logging.getLogger(__name__)

WRITE_BLOCK = 1024 * 1024
"""Bytes gathered per write. A download holds at most two blocks: one being written, one
being filled."""


class PartialFile:
    def __init__(self, path: Path, file: AsyncBufferedIOBase, written: disk.Sha256) -> None:
        self.path = path
        self._file: AsyncBufferedIOBase | None = file
        self._written = written
        self._buffer = bytearray()
        self._pending: asyncio.Future[int] | None = None

    @classmethod
    async def open(cls, path: Path) -> PartialFile:
        """Resume the partial file at `path` if it exists (re-hashing it), else create it."""
        with disk_errors(f"opening {path.name}"):
            if await asyncio.to_thread(path.exists):
                written = await asyncio.to_thread(disk.hash_file, path)
                file = await aiofiles.open(path, "ab", opener=disk.no_follow)
                logger.info(
                    "resuming %s: re-hashed %d bytes already on disk", path.name, written.size
                )
            else:
                written = disk.Sha256()
                file = await aiofiles.open(path, "xb", opener=disk.no_follow)
        return cls(path, file, written)

    @property
    def size(self) -> int:
        """Bytes accepted so far (the offset to resume from)."""
        return self._written.size

    def hexdigest(self) -> str:
        return self._written.hexdigest

    async def write(self, data: bytes) -> None:
        self._require_open()
        self._written.update(data)
        self._buffer += data
        if len(self._buffer) >= WRITE_BLOCK:
            await self._flush_buffer()

    async def _flush_buffer(self) -> None:
        """Start writing the gathered bytes, once the previous write is done."""
        file = self._require_open()
        await self._wait_for_write()
        if self._buffer:
            block, self._buffer = self._buffer, bytearray()
            self._pending = asyncio.ensure_future(self._write(file, block))

    async def _wait_for_write(self) -> None:
        """Wait for the write in progress; raise DiskError if it failed."""
        pending = self._pending
        if pending is None:
            return
        try:
            # Shielded: a cancelled download leaves the write running; `close` waits for it,
            # so writes never overlap and the file is never closed under one.
            with disk_errors(f"writing {self.path.name}"):
                await asyncio.shield(pending)
        finally:
            if pending.done():
                self._pending = None

    async def _write(self, file: AsyncBufferedIOBase, data: bytearray) -> int:
        """The one call that puts bytes on disk (a seam for tests that inject disk faults)."""
        return await file.write(data)

    async def restart(self) -> None:
        """Drop everything written so far: the next byte written is byte 0."""
        file = self._require_open()
        self._buffer = bytearray()
        await self._settle()
        with disk_errors(f"truncating {self.path.name}"):
            await file.seek(0)
            await file.truncate()
        self._written.reset()

    async def publish(
        self,
        target: Path,
        *,
        expected_size: int | None,
        expected_sha256: str | None,
        upstream_sha256: str | None,
    ) -> str:
        """Verify, then move into place; returns the digest. The partial file is consumed."""
        if expected_size is not None and self.size != expected_size:
            raise VerificationFailed(
                f"size mismatch: received {self.size} bytes, expected {expected_size}"
            )
        digest = self.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise VerificationFailed(f"sha256 mismatch: expected {expected_sha256}, got {digest}")
        if upstream_sha256 is not None and digest != upstream_sha256:
            raise VerificationFailed(
                f"sha256 mismatch: the upstream announced {upstream_sha256}, got {digest}"
            )
        file = self._require_open()
        with disk_errors(f"publishing {target.name}"):
            await self._flush_buffer()
            await self._wait_for_write()
            await file.flush()
            await self.close()
            try:
                await asyncio.to_thread(disk.publish, self.path, target)
            except FileExistsError:
                # Names are reserved before a download starts; this is a last line of defence.
                raise VerificationFailed(
                    f"{target.name} appeared while downloading; not overwritten"
                ) from None
        return digest

    async def close(self) -> None:
        """Close the file, keeping it on disk (to resume later; re-hashed then)."""
        if self._file is None:
            return
        with contextlib.suppress(DiskError):  # what did not reach the disk is fetched again
            await self._flush_buffer()
        await self._settle()
        file, self._file = self._file, None
        with contextlib.suppress(OSError):
            await asyncio.shield(file.close())

    async def discard(self) -> None:
        """Close and remove the partial file."""
        self._buffer = bytearray()
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

    def _require_open(self) -> AsyncBufferedIOBase:
        if self._file is None:
            raise RuntimeError(f"{self.path.name} is closed")
        return self._file


@contextlib.contextmanager
def disk_errors(doing: str) -> Iterator[None]:
    """The one translation of OSError into DiskError (naming the cause) for a job's files."""
    try:
        yield
    except OSError as exc:
        raise DiskError.from_os_error(exc, doing) from exc
