"""A download job: what was asked, what is known about the upstream object, where it stands."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay.downloads.rate import RateMeter


class JobState(enum.StrEnum):
    """Where a download job stands (stored as its value)."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def active(self) -> bool:
        return self in (JobState.QUEUED, JobState.RUNNING)


@dataclass(kw_only=True, eq=False)
class Job:
    id: str
    path: str
    """The route path (with query) the job was asked for; resolved again at every start."""
    url: str
    """The upstream URL the path resolved to when the job was created."""
    name: str
    expected_sha256: str | None = None
    expected_size: int | None = None
    state: JobState = JobState.QUEUED
    bytes_done: int = 0
    total: int | None = None
    """The object's complete length, from Content-Length (200) or Content-Range (206)."""
    attempts: int = 0
    """Upstream requests made for this job, over its whole life."""
    error: str | None = None
    sha256: str | None = None
    """The verified digest of the published file."""
    validator: str | None = None
    """A strong ETag or Last-Modified of the object, sent as If-Range on a resume."""
    byte_ranges: bool = False
    upstream_sha256: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    rate: RateMeter = field(default_factory=RateMeter, repr=False)

    @property
    def key(self) -> str:
        """Requests with the same key ask for the same file: they share one job."""
        return "\n".join((self.url, self.expected_sha256 or "", str(self.expected_size), self.name))

    def touch(self) -> None:
        self.updated = time.time()

    def to_json(self) -> dict[str, Any]:
        rate = self.rate.bytes_per_second() if self.state == JobState.RUNNING else None
        eta = None
        if rate and self.total is not None:
            eta = round(max(self.total - self.bytes_done, 0) / rate, 1)
        return {
            "id": self.id,
            "state": self.state.value,
            "path": _without_query(self.path),
            "url": _without_query(self.url),
            "name": self.name,
            "bytes_done": self.bytes_done,
            "total": self.total,
            "rate": round(rate, 1) if rate is not None else None,
            "eta_seconds": eta,
            "attempts": self.attempts,
            "error": self.error,
            "sha256": self.sha256,
            "expected_sha256": self.expected_sha256,
            "expected_size": self.expected_size,
            "file": f"/files/{self.name}" if self.state == JobState.COMPLETED else None,
            "created": _iso(self.created),
            "updated": _iso(self.updated),
        }


def _without_query(url: str) -> str:
    # A query may carry signatures or tokens; anyone who can list jobs must not see them.
    return url.split("?", 1)[0]


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
