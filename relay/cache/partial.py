"""A fill's partial file, on the cache's threads: each chunk written at its offset and added to
the running SHA-256 in one job, then fsync and publish (`Store.publish`) in one job ordered
with the other jobs on the object's files. A job cancelled meanwhile is waited out: a thread
cannot be stopped, and a descriptor closed under a write in flight could be reused by another
file by the time the write runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from relay.cache.executor import DiskExecutor
from relay.cache.store import Meta, Store

if TYPE_CHECKING:
    from _hashlib import HASH


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
        while not write.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({write})
        if not write.cancelled():
            write.exception()  # retrieved: the cancellation is what the caller sees
        raise
