"""Durable files: exclusive create, hash while writing, fsync, directory fsync, publish.

The one copy of the protocol every program that writes bodies to disk follows (download
jobs and `relay fetch` through `relay.transfer.PartialFile`, the cache directly):

- a file being written is created with O_CREAT|O_EXCL and O_NOFOLLOW (`open_exclusive`): a
  fresh start never writes into a file someone else opened, nor through a planted symlink;
  while it is written it is locked (`try_lock`), so a second process cannot take it over;
- every chunk goes to the SHA-256 as it is written (`HashingWriter`, bandersnatch's way), so
  the digest is ready when the last byte lands; a resume re-hashes what is on disk first;
- `publish` fsyncs the file, gives it its final name *without overwriting* (a hard link,
  which fails if the name exists; where links are unsupported, a checked rename), removes the
  temporary name and fsyncs the directory. The final name never exists before the bytes were
  complete, and a crash leaves either the temporary file or the complete final file.

Everything here is blocking: async callers run it in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no advisory locks
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from _hashlib import HASH

__all__ = [
    "READ_BLOCK",
    "HashingWriter",
    "Sha256",
    "create_exclusive",
    "fsync_dir",
    "fsync_path",
    "hash_file",
    "no_follow",
    "open_exclusive",
    "publish",
    "remove_quietly",
    "remove_tree",
    "replace",
    "truncate",
    "try_lock",
    "write_atomically",
    "write_chunks",
]

READ_BLOCK = 1024 * 1024
"""Bytes read per block when re-hashing a file already on disk."""

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
# link() is refused by some filesystems (FAT, some FUSE and network mounts): fall back to a
# checked rename there.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
_IOV_MAX = 1024  # buffers per writev call (Linux's IOV_MAX; the BSDs' too)


def no_follow(path: str, flags: int) -> int:
    """An `open(..., opener=)` that never follows a symlink planted at `path`."""
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o666)


def create_exclusive(path: Path) -> int:
    """A write descriptor of a new file at `path`; FileExistsError if anything (even a
    symlink) is there."""
    return os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _NOFOLLOW | _CLOEXEC, 0o666)


def open_exclusive(path: Path) -> BinaryIO:
    """Create `path` for writing; FileExistsError if anything (even a symlink) is there."""
    return os.fdopen(create_exclusive(path), "wb")


def try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock (`flock`) on an open file; False when another open file
    description holds it. Released when the file is closed (or the process ends: a crash never
    leaves it stale). Always True where `flock` does not exist."""
    if fcntl is None:  # pragma: no cover - non-POSIX
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def truncate(file: IO[bytes]) -> None:
    """Empty an open file, durably: written-over bytes never come back after a crash."""
    file.seek(0)
    file.truncate()
    file.flush()
    os.fsync(file.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file's data by name (any descriptor of the inode flushes it)."""
    fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make creations, renames and removals in the directory `path` durable.

    A no-op where directories cannot be opened or fsynced (Windows, some network mounts).
    """
    try:
        fd = os.open(path, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    except OSError:
        if os.name == "posix" and _DIRECTORY:
            raise  # a missing or unreadable directory on POSIX is a real error
        return  # pragma: no cover - non-POSIX
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def publish(src: Path, dst: Path) -> None:
    """Durably give `src` the name `dst`, never replacing an existing `dst`.

    fsync src, link it to dst (FileExistsError if dst exists), remove src, fsync dst's
    directory. On a failure before dst exists, src is left in place.
    """
    fsync_path(src)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        # No hard links here: check, then rename (a window remains only on such filesystems).
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
    else:
        remove_quietly(src)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def replace(src: Path, dst: Path) -> None:
    """Durably rename `src` over `dst` (for callers told to overwrite, e.g. `--force`)."""
    fsync_path(src)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    if src.parent != dst.parent:
        fsync_dir(src.parent)


def remove_quietly(path: Path) -> None:
    """Unlink `path`; already gone is fine."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class Sha256:
    """A running SHA-256 and byte count: what a body's bytes hash to so far."""

    __slots__ = ("_hash", "size")

    def __init__(self) -> None:
        self._hash: HASH = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._hash.update(data)
        self.size += len(data)

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def reset(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0

    def update_from(self, file: IO[bytes]) -> None:
        """Hash what `file` yields from its position to its end."""
        while block := file.read(READ_BLOCK):
            self.update(block)


def hash_file(path: Path) -> Sha256:
    """The SHA-256 state and size of a file's contents, never through a symlink."""
    state = Sha256()
    with open(path, "rb", opener=no_follow) as fh:
        state.update_from(fh)
    return state


class HashingWriter:
    """Wraps a binary file: every `write` also updates the SHA-256 and the size.

    `resume=True` first hashes the bytes already in the file (which must be readable and
    seekable) and leaves the position at its end, so writing continues the same digest.
    """

    def __init__(self, file: IO[bytes], *, resume: bool = False) -> None:
        self.file = file
        self._state = Sha256()
        if resume:
            file.seek(0)
            self._state.update_from(file)
            file.seek(0, os.SEEK_END)

    @property
    def sha256(self) -> str:
        """Hex digest of everything written (and resumed) so far."""
        return self._state.hexdigest

    @property
    def size(self) -> int:
        return self._state.size

    def write(self, data: bytes | bytearray | memoryview) -> int:
        written = self.file.write(data)
        self._state.update(data)
        return written

    def truncate(self) -> None:
        """Start over: empty the file (durably) and the digest."""
        truncate(self.file)
        self._state.reset()

    def sync(self) -> None:
        """Flush and fsync the file."""
        self.file.flush()
        os.fsync(self.file.fileno())


def write_chunks(file: IO[bytes], chunks: Sequence[bytes]) -> int:
    """Write the chunks at the file's position in gathered writes (`writev`: no copy into one
    buffer); returns the bytes written. The file object's own buffer is flushed first, and
    its position is the descriptor's afterwards."""
    file.flush()
    if not hasattr(os, "writev"):  # pragma: no cover - non-POSIX
        return sum(file.write(chunk) for chunk in chunks)
    fd = file.fileno()
    views = [memoryview(chunk) for chunk in chunks if chunk]
    written = 0
    first = 0  # views before it are written
    while first < len(views):
        n = os.writev(fd, views[first : first + _IOV_MAX])
        written += n
        while first < len(views) and n >= len(views[first]):
            n -= len(views[first])
            first += 1
        if n:  # a short write: the rest of this view goes next
            views[first] = views[first][n:]
    return written


def write_atomically(path: Path, data: bytes) -> None:
    """Write tmp, fsync, rename, fsync the directory: `path` holds the old or the new content.

    The temporary file is created exclusively under a name of its own (`<name>.<random>.tmp`),
    so two writers of one path never write into each other's file, and never through a
    planted symlink; it is removed if anything fails before the rename."""
    tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
    fd = create_exclusive(tmp)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        replace(tmp, path)  # fsyncs tmp, renames, fsyncs the directory
    except BaseException:
        remove_quietly(tmp)
        raise


def remove_tree(path: Path) -> None:
    """Remove a file or a whole object directory; already gone is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        remove_quietly(path)
