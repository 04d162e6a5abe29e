"""How a download job ends or retries (never an answer to a request: the downloads API's
errors, DownloadsError and its subclasses, are members of the one tree in `relay.errors`).

JobFailed               ends a job in state "failed" with a short reason (never retried)
├── VerificationFailed  the body does not match its expected size or sha256
└── DiskError           writing the partial file failed (ENOSPC, EIO, ...)
UpstreamFailure         one upstream attempt failed; the job resumes if attempts remain
"""

from __future__ import annotations

import errno
import os


class JobFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class VerificationFailed(JobFailed):
    pass


class DiskError(JobFailed):
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


class UpstreamFailure(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
