"""What the cache's volume must provide when several workers share it, checked at startup.

Workers coordinate through the file system: a fill lock per key (`flock`,
`relay.cache.workers.lead`), a SQLite ledger in WAL mode (POSIX byte-range locks and a shared
memory map of its `-shm` file), files created exclusively and published by hard link. A
network or user-space file system can accept these calls and not honour them between
processes (NFS has `flock` emulated on byte-range locks and leases lost with the server; SMB,
FUSE mounts such as sshfs or s3fs, 9p and virtiofs shares of VMs and containers each have
their own idea), and then two workers would fill one object into one file or spend the same
budget twice. So with workers > 1, before the cache opens:

1. the file system's type (`statfs` `f_type`) must not be one of `REFUSED` (network, cluster
   and user-space file systems); and
2. a live test: this process takes an `flock` on a file in the cache's directory, and a second
   process must find it taken (then free once released).

Either failing refuses to start, with a message saying what the volume must provide: a local
file system (ext4, xfs, btrfs, zfs, tmpfs, overlayfs over one of these). With one worker
nothing is checked: no lock is relied on.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

from relay.disk import remove_quietly

#: statfs f_type magic numbers of file systems the cache does not trust with its locks.
REFUSED: dict[int, str] = {
    0x6969: "nfs",
    0x517B: "smb",
    0xFF534D42: "cifs",
    0xFE534D42: "smb2",
    0x65735546: "fuse",
    0x01021997: "9p",
    0x6A656A63: "virtiofs",
    0x00C36400: "ceph",
    0x5346414F: "afs",
    0x6B414653: "afs",
    0x73757245: "coda",
    0x564C: "ncp",
    0x0BD00BD0: "lustre",
    0x01161970: "gfs2",
    0x7461636F: "ocfs2",
    0x47504653: "gpfs",
}

REQUIREMENT = (
    "with workers > 1 the cache's volume must be a local file system (ext4, xfs, btrfs, zfs, "
    "tmpfs, overlayfs over one of these) that honours flock and POSIX locks between "
    "processes: give cache_dir such a volume, or run one worker"
)

_PROBE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print("held")
else:
    print("free")
"""


class UnfitVolume(OSError):
    """The cache's volume does not provide what workers sharing it need (`strerror` says
    what and why)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EOPNOTSUPP, message)


def file_system_type(path: Path) -> int | None:
    """The `statfs` f_type of the file system holding `path`; None where it cannot be asked."""
    name = ctypes.util.find_library("c")
    if name is None or not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if libc.statfs(os.fsencode(path), buffer) != 0:
        return None
    return int(ctypes.c_long.from_buffer(buffer).value) & 0xFFFFFFFF


def check(directory: Path, *, f_type: int | None = None) -> None:
    """Refuse (`UnfitVolume`) a volume whose locks several workers cannot rely on: its type,
    then a live lock test between two processes. `f_type`: the type to judge (tests)."""
    kind = file_system_type(directory) if f_type is None else f_type
    if kind is not None and kind in REFUSED:
        raise UnfitVolume(
            f"{directory} is on {REFUSED[kind]} (statfs type {kind:#x}): {REQUIREMENT}"
        )
    # A probe file of this process's own: workers starting together test at the same time.
    probe = directory / f"volume-check.{os.getpid()}.lock"
    fd = os.open(probe, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        held = _other_process_sees(probe)
        fcntl.flock(fd, fcntl.LOCK_UN)
        free = _other_process_sees(probe)
    finally:
        os.close(fd)
        remove_quietly(probe)
    if held != "held" or free != "free":
        raise UnfitVolume(
            f"{directory}: a lock taken by one process was {held!r} to another, then "
            f"{free!r} once released (expected 'held', then 'free'): {REQUIREMENT}"
        )


def _other_process_sees(probe: Path) -> str:
    try:
        done = subprocess.run(  # noqa: S603 - this interpreter, a fixed script
            [sys.executable, "-I", "-S", "-c", _PROBE, str(probe)],
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"untested ({exc})"
    return done.stdout.decode(errors="replace").strip() or done.stderr.decode(errors="replace")


__all__ = ["REFUSED", "REQUIREMENT", "UnfitVolume", "check", "file_system_type"]
