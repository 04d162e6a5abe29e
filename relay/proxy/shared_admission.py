"""Stream slots shared by the server's worker processes (workers > 1).

`max_streams` and `max_streams_per_client` hold for the whole server, whichever worker a
request reaches: the counts live in a small file in the run directory, mapped into every
worker, and each check-and-take runs under an exclusive `flock` on it.

Why a `flock` and these rows:
- The kernel drops a `flock` with its holder's file descriptor: a worker killed while holding
  it never leaves the others locked out (a semaphore or a mutex in shared memory would).
- Each worker counts its own slots in its own column; a count for the server is the sum of the
  columns. A dead worker's slots come back by zeroing its column (`SlotTable.clear_worker`:
  the supervisor does it when it reaps the worker, the replacement again when it starts), with
  no record of which streams it held.
- Per-client counts are rows of an open-addressing table keyed by a 64-bit hash of the client
  address (blake2b: the same in every process, unlike `hash()`), linear probing, a row freed
  when its counts reach zero (backward-shift deletion, so no tombstones). Clients with a
  stream number at most `max_streams`; the table has at least twice as many rows, so it never
  fills and probes stay short.

The lock is held for a few microseconds (two system calls and a few reads of shared memory
per acquire and per release): measured in `bench` as part of the request cost.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from relay.errors import Overloaded, RelayError, TooManyStreams
from relay.proxy.admission import StreamLimiter

try:
    import fcntl
except ImportError:  # pragma: no cover - POSIX only: workers > 1 needs fork/exec and flock
    fcntl = None  # type: ignore[assignment]

SLOTS_FILE = "streams.slots"
_WORD = 8


def _client_key(client: str) -> int:
    """A nonzero 63-bit key for a client address, the same in every process."""
    digest = hashlib.blake2b(client.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return (int.from_bytes(digest, "little") >> 1) or 1


def _table_rows(max_streams: int) -> int:
    rows = 2
    while rows < 2 * max_streams:
        rows *= 2
    return rows


class SlotTable:
    """The mapped file: `workers` totals, then `rows` rows of (key, one count per worker)."""

    def __init__(self, path: Path, *, workers: int, max_streams: int, per_client: bool) -> None:
        self.workers = workers
        self.rows = _table_rows(max_streams) if per_client else 0
        self._width = 1 + workers
        words = workers + self.rows * self._width
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(path, flags, 0o600)
        try:
            if os.fstat(self._fd).st_size < words * _WORD:
                os.ftruncate(self._fd, words * _WORD)
            self._map = mmap.mmap(self._fd, words * _WORD)
        except BaseException:
            os.close(self._fd)
            raise
        self._words = memoryview(self._map).cast("q")

    @classmethod
    def create(cls, run_dir: Path, *, workers: int, max_streams: int, per_client: bool) -> None:
        """Make the zeroed file for a run (the supervisor, before starting workers)."""
        cls(run_dir / SLOTS_FILE, workers=workers, max_streams=max_streams, per_client=per_client)
        # Closed at once: each worker maps it itself (a fork-inherited descriptor would
        # share the supervisor's lock instead of excluding it).

    def close(self) -> None:
        self._words.release()
        self._map.close()
        os.close(self._fd)

    @contextmanager
    def locked(self) -> Iterator[memoryview]:
        if fcntl is not None:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield self._words
        finally:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    # ---- under the lock -------------------------------------------------------------------

    def total(self, words: memoryview) -> int:
        return sum(words[: self.workers])

    def _row_base(self, row: int) -> int:
        return self.workers + row * self._width

    def _home(self, key: int) -> int:
        return key & (self.rows - 1)

    def find(self, words: memoryview, key: int) -> int:
        """The row holding `key`, or the empty row where it would go."""
        row = self._home(key)
        while True:
            stored = words[self._row_base(row)]
            if stored == key or stored == 0:
                return row
            row = (row + 1) & (self.rows - 1)

    def held(self, words: memoryview, row: int) -> int:
        base = self._row_base(row)
        return sum(words[base + 1 : base + self._width])

    def add(self, words: memoryview, key: int, worker: int, delta: int) -> None:
        row = self.find(words, key)
        base = self._row_base(row)
        if words[base] == 0:
            if delta <= 0:
                return  # not held (cleared when a worker died): nothing to give back
            words[base] = key
        words[base + 1 + worker] = max(0, words[base + 1 + worker] + delta)
        if self.held(words, row) == 0:
            self._delete(words, row)

    def _delete(self, words: memoryview, row: int) -> None:
        """Free `row`, shifting later rows of its probe run back (Knuth 6.4, algorithm R)."""
        mask = self.rows - 1
        hole = row
        probe = row
        while True:
            probe = (probe + 1) & mask
            base = self._row_base(probe)
            key = words[base]
            if key == 0:
                break
            home = self._home(key)
            # Move the row into the hole unless its home lies cyclically in (hole, probe].
            if (probe > hole and (home <= hole or home > probe)) or (
                probe < hole and (home <= hole and home > probe)
            ):
                dst = self._row_base(hole)
                words[dst : dst + self._width] = words[base : base + self._width]
                hole = probe
        dst = self._row_base(hole)
        words[dst : dst + self._width] = memoryview(bytes(self._width * _WORD)).cast("q")

    def clear_worker(self, worker: int) -> None:
        """Give back every slot `worker` held (it died, or it is starting afresh)."""
        with self.locked() as words:
            words[worker] = 0
            if not self.rows:
                return
            kept: list[tuple[int, list[int]]] = []
            for row in range(self.rows):
                base = self._row_base(row)
                key = words[base]
                if key == 0:
                    continue
                counts = list(words[base + 1 : base + self._width])
                counts[worker] = 0
                if any(counts):
                    kept.append((key, counts))
            zero = memoryview(bytes(self.rows * self._width * _WORD)).cast("q")
            words[self.workers :] = zero
            for key, counts in kept:
                base = self._row_base(self.find(words, key))
                words[base] = key
                words[base + 1 : base + self._width] = memoryview(
                    b"".join(c.to_bytes(_WORD, "little", signed=True) for c in counts)
                ).cast("q")


class SharedStreamLimiter(StreamLimiter):
    """`StreamLimiter`'s contract (acquire, release, try_acquire) for the whole server.

    `active` and `by_client` are this worker's own share (what it must give back), so the
    same leak checks hold for each worker as for a single process.
    """

    def __init__(
        self, path: Path, *, worker: int, workers: int, limit: int, per_client: int = 0
    ) -> None:
        super().__init__(limit, per_client)
        self.worker = worker
        self.table = SlotTable(path, workers=workers, max_streams=limit, per_client=per_client > 0)
        self.table.clear_worker(worker)

    def close(self) -> None:
        self.table.close()

    def acquire(self, client: str | None = None) -> RelayError | None:
        table = self.table
        counted = bool(self.per_client) and client is not None
        with table.locked() as words:
            if table.total(words) >= self.limit:
                return Overloaded("too many downloads in progress; retry shortly")
            if counted:
                assert client is not None
                key = _client_key(client)
                if table.held(words, table.find(words, key)) >= self.per_client:
                    return TooManyStreams("too many downloads in progress from this client")
                table.add(words, key, self.worker, 1)
            words[self.worker] += 1
        self.active += 1
        if counted:
            assert client is not None
            self.by_client[client] = self.by_client.get(client, 0) + 1
        return None

    def release(self, client: str | None = None) -> None:
        table = self.table
        counted = bool(self.per_client) and client is not None
        with table.locked() as words:
            words[self.worker] = max(0, words[self.worker] - 1)
            if counted:
                assert client is not None
                table.add(words, _client_key(client), self.worker, -1)
        self.active -= 1
        if counted:
            assert client is not None
            held = self.by_client.pop(client, 0) - 1
            if held > 0:
                self.by_client[client] = held

    def server_active(self) -> int:
        """Streams held by every worker together."""
        with self.table.locked() as words:
            return self.table.total(words)
