"""Durable writes, local to the cache until relay/disk.py (branch refactor/disk-errors) lands:
the same names (`fsync_dir`, `publish`, `remove_quietly`), to switch by changing one import."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(src: Path, dst: Path) -> None:
    """Rename `src` over `dst` and make the rename durable."""
    os.replace(src, dst)
    fsync_dir(dst.parent)


def write_atomically(path: Path, data: bytes) -> None:
    """Write tmp, fsync, rename, fsync the directory: `path` is the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    publish(tmp, path)


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
