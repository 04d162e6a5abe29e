"""Errors of the downloads feature.

DownloadsError          answered as a short JSON error: {"error": ..., "field": ...}
├── InvalidField        400/422: a request field is malformed or refused
├── Conflict            409: the name is taken by another download or a different file
├── NotFound            404: no such job or file
├── InsufficientStorage 507: the store is full (downloads_max_jobs, downloads_max_bytes)
└── Unavailable         503 (or 404 when disk features are off)

JobFailed               ends a job in state "failed" with a short reason (never retried)
├── VerificationFailed  the body does not match its expected size or sha256
└── DiskError           writing the partial file failed (ENOSPC, EIO, ...)
UpstreamFailure         one upstream attempt failed; the job resumes if attempts remain
"""

from __future__ import annotations

import errno
import os


class DownloadsError(Exception):
    status_code = 400

    def __init__(self, reason: str, *, field: str | None = None, status_code: int | None = None):
        super().__init__(reason)
        self.reason = reason
        self.field = field
        if status_code is not None:
            self.status_code = status_code

    def to_json(self) -> dict[str, str]:
        out = {"error": f"{self.field}: {self.reason}" if self.field else self.reason}
        if self.field:
            out["field"] = self.field
        return out


class InvalidField(DownloadsError):
    status_code = 422

    def __init__(self, field: str, reason: str, *, status_code: int | None = None) -> None:
        super().__init__(reason, field=field, status_code=status_code)


class Conflict(DownloadsError):
    status_code = 409


class NotFound(DownloadsError):
    status_code = 404


class InsufficientStorage(DownloadsError):
    status_code = 507


class Unavailable(DownloadsError):
    status_code = 503


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
