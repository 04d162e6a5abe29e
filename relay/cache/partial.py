"""A fill's partial file, on the cache's threads: created (its bucket made) and opened for its
readers in one job; each chunk written at its offset and added to the running SHA-256 in one
job; then fsync and publish (`Store.publish`) in one job ordered with the other jobs on the
object's files. A job cancelled meanwhile is waited out: a thread cannot be stopped, and a
descriptor closed under a write in flight could be reused by another file by the time the write
runs.

Not `relay.transfer.PartialFile` (downloads to disk and `relay fetch`): a fill's file is read
by its clients while it is written (each reader follows the written length), lives in the
cache's store with its metadata, and is published by the store's rules; a transfer's file has
one writer and no reader until it is verified and renamed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from relay.cache.executor import DiskExecutor
from relay.cache.store import Meta, Store

if TYPE_CHECKING:
    from _hashlib import HASH

T = TypeVar("T")


def _open(store: Store, path: Path) -> tuple[int, int]:
    """Create the partial file (`Store.open_partial`) and open it for reading (blocking):
    (the write descriptor, the read descriptor)."""
    fd = store.open_partial(path)
    try:
        return fd, os.open(path, os.O_RDONLY)
    except BaseException:
        os.close(fd)
        raise


async def open_partial(executor: DiskExecutor, store: Store, path: Path) -> tuple[int, int]:
    """`_open` on the cache's threads: (the descriptor the fill writes through, the one its
    readers read from). Cancelled meanwhile, it closes both once the job is over."""
    job = executor.submit(_open, store, path)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await outlast(job)
        if not job.cancelled() and job.exception() is None:
            for fd in job.result():
                os.close(fd)
        raise


async def outlast(job: asyncio.Future[T]) -> None:
    """Wait until a job the caller was cancelled from is over (a thread cannot be stopped);
    its exception, if any, is retrieved: the cancellation is what the caller sees."""
    while not job.done():
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait({job})
    if not job.cancelled():
        job.exception()


def _write_hashed(fd: int, chunk: bytes, offset: int, digest: HASH) -> None:
    """Write `chunk` at `offset` (all of it) and add it to the running digest (blocking)."""
    view = memoryview(chunk)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    digest.update(chunk)


def publish(fd: int, store: Store, partial: Path, meta: Meta) -> None:
    """fsync the partial file written through `fd`, then publish it (blocking)."""
    os.fsync(fd)
    store.publish(partial, meta)


async def write_at(executor: DiskExecutor, fd: int, data: bytes, offset: int, digest: HASH) -> None:
    """`_write_hashed` on the cache's threads. Cancelled meanwhile (a fill being stopped), it
    returns only once the write is over: the caller closes `fd` next."""
    write = executor.submit(_write_hashed, fd, data, offset, digest)
    try:
        await asyncio.shield(write)
    except asyncio.CancelledError:
        await outlast(write)
        raise
