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
- `publish` checks size and digest, fsyncs the file, `os.replace`s it into `files/{name}`
  and fsyncs that directory. The final name never exists before the bytes were verified
  (apt's "Hash Sum mismatch" is never published), and a crash leaves either the partial file
  or the complete final file, never a torn one.

Disk errors (ENOSPC, EIO, ...) come out as `DiskError` naming the cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import aiofiles
from aiofiles.threadpool.binary import AsyncBufferedIOBase

from relay.downloads.errors import DiskError, VerificationFailed

if TYPE_CHECKING:
    from _hashlib import HASH

logger = logging.getLogger(__name__)

REHASH_BLOCK = 1024 * 1024
WRITE_BLOCK = 1024 * 1024
"""Bytes gathered per write. A download holds at most two blocks: one being written, one
being filled."""


class PartialFile:
    def __init__(self, path: Path, file: AsyncBufferedIOBase, hasher: HASH, size: int) -> None:
        self.path = path
        self._file: AsyncBufferedIOBase | None = file
        self._hasher = hasher
        self._size = size
        self._buffer = bytearray()
        self._pending: asyncio.Future[int] | None = None

    @classmethod
    async def open(cls, path: Path) -> PartialFile:
        """Resume the partial file at `path` if it exists (re-hashing it), else create it."""
        try:
            if await asyncio.to_thread(path.exists):
                hasher, size = await asyncio.to_thread(hash_file, path)
                file = await aiofiles.open(path, "ab", opener=_no_follow)
                logger.info("resuming %s: re-hashed %d bytes already on disk", path.name, size)
            else:
                hasher, size = hashlib.sha256(), 0
                file = await aiofiles.open(path, "xb", opener=_no_follow)
        except OSError as exc:
            raise DiskError.from_os_error(exc, f"opening {path.name}") from exc
        return cls(path, file, hasher, size)

    @property
    def size(self) -> int:
        """Bytes accepted so far (the offset to resume from)."""
        return self._size

    def hexdigest(self) -> str:
        return self._hasher.hexdigest()

    async def write(self, data: bytes) -> None:
        self._require_open()
        self._hasher.update(data)
        self._size += len(data)
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
            await asyncio.shield(pending)
        except OSError as exc:
            raise DiskError.from_os_error(exc, f"writing {self.path.name}") from exc
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
        try:
            await file.seek(0)
            await file.truncate()
        except OSError as exc:
            raise DiskError.from_os_error(exc, f"truncating {self.path.name}") from exc
        self._hasher = hashlib.sha256()
        self._size = 0

    async def publish(
        self,
        target: Path,
        *,
        expected_size: int | None,
        expected_sha256: str | None,
        upstream_sha256: str | None,
    ) -> str:
        """Verify, then move into place; returns the digest. The partial file is consumed."""
        if expected_size is not None and self._size != expected_size:
            raise VerificationFailed(
                f"size mismatch: received {self._size} bytes, expected {expected_size}"
            )
        digest = self.hexdigest()
        if expected_sha256 is not None and digest != expected_sha256:
            raise VerificationFailed(f"sha256 mismatch: expected {expected_sha256}, got {digest}")
        if upstream_sha256 is not None and digest != upstream_sha256:
            raise VerificationFailed(
                f"sha256 mismatch: the upstream announced {upstream_sha256}, got {digest}"
            )
        file = self._require_open()
        try:
            await self._flush_buffer()
            await self._wait_for_write()
            await file.flush()
            await asyncio.to_thread(os.fsync, file.fileno())
            await self.close()
            await asyncio.to_thread(_move_into_place, self.path, target)
        except OSError as exc:
            raise DiskError.from_os_error(exc, f"publishing {target.name}") from exc
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
        await asyncio.to_thread(remove_quietly, self.path)

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


def _no_follow(path: str, flags: int) -> int:
    # Never write through a symlink planted where a partial file should be.
    return os.open(path, flags | os.O_NOFOLLOW, 0o666)


def hash_file(path: Path) -> tuple[HASH, int]:
    """The SHA-256 state and size of a file's contents (blocking: run it in a thread)."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb", opener=_no_follow) as fh:
        while block := fh.read(REHASH_BLOCK):
            hasher.update(block)
            size += len(block)
    return hasher, size


def _move_into_place(partial: Path, target: Path) -> None:
    if target.exists():
        # Names are reserved before a download starts; this is a last line of defence.
        raise VerificationFailed(f"{target.name} appeared while downloading; not overwritten")
    os.replace(partial, target)
    fsync_directory(target.parent)


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
