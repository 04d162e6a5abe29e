"""How a transfer fails: each error says whether another attempt may succeed.

    TransferError          the transfer cannot complete; `reason` is one short line
    ├── AttemptFailed      one attempt failed (refused, reset, dropped, timed out, short of
    │                      its length, a transient status): retried while the budget lasts,
    │                      raised once it is spent (`failures` says after how many)
    ├── UnexpectedStatus   the upstream answered a status that is not retried (403, 404, ...)
    ├── UnusableResume     an answer to a resume request cannot continue the body (a 206 at
    │                      another offset or of another version, a 416), nor did starting again
    ├── VerificationFailed the bytes are not the ones expected (size or sha256): never
    │                      published, never kept
    ├── DiskError          reading or writing the partial file failed (ENOSPC, EIO, ...)
    ├── FileInUse          another process holds the partial file
    └── TargetExists       the final name exists and the caller did not allow replacing it

Each program translates these into its own outcomes in one place: a download job's
`JobFailed` (`relay.downloads.errors`), `relay fetch`'s exit codes (`relay.fetch.errors`).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class StatusLine:
    """What an upstream answered: status, reason phrase and the URL that answered."""

    status: int
    phrase: str
    url: str


class TransferError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class AttemptFailed(TransferError):
    def __init__(
        self,
        reason: str,
        *,
        answer: StatusLine | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(reason)
        self.answer = answer
        """The transient status that failed the attempt, if that is what failed it."""
        self.retry_after = retry_after
        """Seconds the upstream asked to wait (Retry-After), if it did."""
        self.failures = 0
        """Failed attempts counted against the budget when the transfer gave up."""


class UnexpectedStatus(TransferError):
    def __init__(self, answer: StatusLine) -> None:
        super().__init__(f"upstream answered {answer.status}")
        self.answer = answer


class UnusableResume(TransferError):
    pass


class VerificationFailed(TransferError):
    pass


class DiskError(TransferError):
    @classmethod
    def from_os_error(cls, exc: OSError, doing: str) -> DiskError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = "disk full"
        elif exc.errno == errno.EIO:
            what = "I/O error"
        else:
            what = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        code = errno.errorcode.get(exc.errno, "") if exc.errno else ""
        return cls(f"{what} ({code}) {doing}" if code else f"{what} {doing}")


class FileInUse(TransferError):
    pass


class TargetExists(TransferError):
    pass


__all__ = [
    "AttemptFailed",
    "DiskError",
    "FileInUse",
    "StatusLine",
    "TargetExists",
    "TransferError",
    "UnexpectedStatus",
    "UnusableResume",
    "VerificationFailed",
]
