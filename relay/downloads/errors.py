"""How a download job ends (never an answer to a request: the downloads API's errors,
DownloadsError and its subclasses, are members of the one tree in `relay.errors`).

JobFailed   ends a job in state "failed" with a short reason (never retried)

A transfer's failures (`relay.transfer.errors`: the upstream, the partial file, the checks)
become JobFailed in one place, `as_job_failure`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from relay.transfer.errors import AttemptFailed, TransferError


class JobFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@contextlib.contextmanager
def as_job_failure() -> Iterator[None]:
    """A transfer's failure, as the reason the job failed."""
    try:
        yield
    except AttemptFailed as exc:
        raise JobFailed(
            f"{exc.reason} (gave up after {exc.failures} attempts without progress)"
        ) from exc
    except TransferError as exc:
        raise JobFailed(exc.reason) from exc
