"""Admission: a fixed number of relayed streams at once, refusing the rest immediately."""

from __future__ import annotations


class StreamLimiter:
    """Counts streams in flight. Refusing at once (503 + Retry-After) beats queueing: a
    queued client holds a connection and memory while waiting, and CDNs retry elsewhere."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0

    def try_acquire(self) -> bool:
        if self.active >= self.limit:
            return False
        self.active += 1
        return True

    def release(self) -> None:
        self.active -= 1
