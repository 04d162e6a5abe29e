"""The cache's durable writes, on top of relay.disk (the one disk-durability module)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from relay.disk import fsync_dir, remove_quietly, replace

__all__ = ["fsync_dir", "remove_quietly", "remove_tree", "replace", "write_atomically"]


def write_atomically(path: Path, data: bytes) -> None:
    """Write tmp, fsync, rename, fsync the directory: `path` holds the old or the new content."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    replace(tmp, path)  # fsyncs tmp, renames, fsyncs the directory


def remove_tree(path: Path) -> None:
    """Remove a file or a whole object directory; already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_quietly(path)
