"""Downloads to disk with several workers (workers > 1): one store, one runner.

Every worker opens the same job store (SQLite in WAL mode, with a busy timeout), so every
worker answers `GET /downloads/{id}`, lists jobs and serves `/files/`. Jobs run in one worker
only, the **runner**: the worker holding an exclusive `flock` on `data_dir/jobs.runner.lock`.
That lock is the job lease: the kernel drops it the moment its holder dies, however it dies, so
there is no lease to renew and no clock to trust. The other workers try to take it every
`RUNNER_POLL` seconds; the one that does resumes the dead runner's jobs from their partial
files, exactly as a restarted relay does. `max_downloads` then counts the server's jobs.

A job submitted to another worker is recorded queued; the runner picks it up at its next poll.
A job cancelled through another worker has its record ended as cancelled; the runner, whose
saves only ever change an active record (`JobStore.save`), stops it at its next poll or save
and removes its partial file. Submissions take a second lock (`jobs.submit.lock`) around the
check for an existing job and the insert, so two workers never create two jobs for one file.

The supervisor holds `data_dir/relay.lock` for the whole server, so a second relay on the same
directory still refuses to start.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - POSIX only
    fcntl = None  # type: ignore[assignment]

RUNNER_LOCK = "jobs.runner.lock"
SUBMIT_LOCK = "jobs.submit.lock"
RUNNER_POLL = 0.25
"""Seconds between a worker's looks at the store (the runner) or at the runner lock (others)."""
PROGRESS_EVERY = 1.0
"""Seconds between the runner's progress saves (what other workers answer with)."""


class FileLock:
    """An exclusive `flock` on a file, dropped by the kernel when its holder dies."""

    def __init__(self, path: Path) -> None:
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd: int | None = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o640)
        self.held = False

    def try_acquire(self) -> bool:
        if self._fd is None or fcntl is None:
            return False
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def acquire(self) -> None:
        """Wait for the lock (call it on a thread)."""
        if self._fd is not None and fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self.held = True

    def release(self) -> None:
        if self._fd is not None and fcntl is not None and self.held:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.held = False

    def close(self) -> None:
        fd, self._fd = self._fd, None
        self.held = False
        if fd is not None:
            os.close(fd)
