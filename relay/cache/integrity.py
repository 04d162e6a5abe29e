"""Checking stored bytes against a digest, off the event loop.

Hashing a stored object reads every byte of it: it runs in a thread, and stops at its next
read when its caller is cancelled (relay stopping). The digest check of a sliced object
(`relay.cache.slices`) hashes its slices' files here; a scrub of the cache belongs here too.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Sequence
from pathlib import Path

READ_BLOCK = 1024 * 1024


async def sha256_of_files(paths: Sequence[Path]) -> str | None:
    """The SHA-256 of the files' bytes joined in order, hashed in a thread. None when a file
    is gone (evicted or purged meanwhile: nothing left to judge)."""
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    try:
        return await loop.run_in_executor(None, _hash_files, list(paths), stop)
    except OSError:
        return None
    finally:
        stop.set()  # cancelled (relay stopping): the thread stops at its next read


def _hash_files(paths: list[Path], stop: threading.Event) -> str | None:
    """The SHA-256 of the files joined in order (None if stopped)."""
    digest = hashlib.sha256()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            while chunk := os.read(fd, READ_BLOCK):
                if stop.is_set():
                    return None
                digest.update(chunk)
        finally:
            os.close(fd)
    return digest.hexdigest()
