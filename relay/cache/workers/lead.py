"""Who fills a key, chosen by the file system: one lock file per key being filled.

With several worker processes on one `cache_dir`, a fill of an object that is not stored is
run by the one process that takes its key's lock (the *leader*); any other asking meanwhile
*follows* it (`relay.cache.workers.follow`): it reads the leader's partial file, and asks the
upstream nothing. The lock is an `flock` on `fills/<sha256 of key>.lock` under the workers'
directory. `flock` belongs to an open file description, so it is released when its holder
closes the file or dies (SIGKILL included): a killed leader never leaves a key locked. Two
opens in one process are two descriptions, so two caches in one process (the tests' model of
two workers) exclude each other as two processes do.

The lock file holds its leader's *version* (the name its partial file, its head record and
its published files share: `relay.cache.store`): a follower reads it to find what to read.
The leader removes the lock file when its fill is over (before closing it, so nobody takes the
lock on a file that no longer has a name without noticing: `lead` checks the name still
points at the file it locked). A leader that died leaves its lock file and its version
behind: the next leader of the key reads that version (`Lead.previous`) and removes what is
left of it; the first process to open the cache removes them all (`clear`). The number of lock
files is the number of fills in flight plus those of leaders that died.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
from dataclasses import dataclass
from pathlib import Path

from relay.disk import remove_quietly

_VERSION = re.compile(rb"[0-9a-f]{16}")
_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass(slots=True)
class Lead:
    """A key's fill lock, held: release it (`Locks.release`) when the fill is over."""

    name: str
    """The key's digest: the lock file's name."""
    fd: int
    previous: str | None
    """The version a former leader wrote and never cleared (it died): its leftovers are
    this leader's to remove."""
    released: bool = False
    """Released already: a second release does nothing (its descriptor may be another's)."""


class Locks:
    """The fill locks of one cache directory (`directory`: where the lock files live)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.lock"

    def lead(self, name: str, version: str) -> Lead | None:
        """Take the fill lock of the key whose digest is `name` for the fill of `version`;
        None when another fill (in any process) holds it. Blocking, but never waits: a few
        system calls."""
        path = self.path(name)
        for _ in range(8):  # the holder may remove the file between our open and our lock
            fd = os.open(path, _FLAGS, 0o600)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    return None
                if not _same_file(fd, path):
                    os.close(fd)  # locked a file its leader just removed: take the new one
                    continue
                previous = _version(os.pread(fd, 64, 0))
                os.ftruncate(fd, 0)
                os.pwrite(fd, version.encode(), 0)
            except BaseException:
                _close_quietly(fd)
                raise
            return Lead(name, fd, previous)
        raise OSError(errno.EAGAIN, "fill lock file keeps being replaced", str(path))

    def release(self, lead: Lead) -> None:
        """The fill is over, its files published or removed: the lock file goes, then the
        lock (closing the file releases it). Once only: later calls do nothing."""
        if lead.released:
            return
        lead.released = True
        try:
            os.ftruncate(lead.fd, 0)
            remove_quietly(self.path(lead.name))
        finally:
            os.close(lead.fd)

    def leader(self, name: str) -> str | None:
        """The version of the fill holding the key's lock now; None when no fill holds it (or
        its leader has not written its version yet: ask again)."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return None
        try:
            if not _held(fd):
                return None
            return _version(os.pread(fd, 64, 0))
        finally:
            os.close(fd)

    def held(self, name: str, version: str) -> bool:
        """Whether the fill of `version` still holds the key's lock (False: it is over, or
        its process died)."""
        return self.leader(name) == version

    def free(self, name: str) -> bool:
        """Whether no fill holds the key's lock (used when cleaning up after leaders)."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return True
        try:
            return not _held(fd)
        finally:
            os.close(fd)

    def clear(self) -> None:
        """Remove every lock file (the first process to open the cache: no fill runs)."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            remove_quietly(path)


def _held(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _version(raw: bytes) -> str | None:
    raw = raw.strip()
    return raw.decode() if _VERSION.fullmatch(raw) else None


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


__all__ = ["Lead", "Locks"]
