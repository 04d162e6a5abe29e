"""The ledger: what every worker of one `cache_dir` stores, what it costs, and in what order
it was used; one SQLite database in WAL mode (`workers/ledger.sqlite`).

- `objects`: one row per stored version the index holds (its key, its data file relative to
  `objects/`, its cost on disk, its place in the LRU order, whether its bytes were verified).
  The budget and the eviction order are this table's: `reserve` and `evict` choose victims
  across all workers in one write transaction, so two workers never both spend the last free
  bytes, and the bytes counted are exactly those of the rows (plus what fills reserved, plus
  the directories and the ledger's own files, measured by the caller).
- `reserved`: what each worker's fills in flight reserved (one row per worker, its `owner`
  token); a worker that died leaves its row, removed by the next worker to start.
- `changes`: every version stored or removed, in order (`seq`): each worker applies the
  changes it has not seen to its in-memory index before it looks an object up (`changes`,
  asked only when the *write counter* moved: `ledger.sqlite-count`, 8 bytes every worker
  maps, bumped after each write transaction commits; reading it costs a lookup a fifth of a
  microsecond, where asking SQLite's `data_version` cost ten), so an object stored, evicted,
  purged or replaced by one worker is seen by all at their next lookup. Old changes are pruned
  (`KEEP_CHANGES`); a worker that fell further behind reloads every row (`rows`).
- LRU order: hits are counted in memory by each worker and written in batches (`touch`: at
  its first lookup `TOUCH_SECONDS` or more after the last batch, before each eviction it
  makes, and when it stops), so the order is shared to within about that delay.

Every method is one short transaction on a connection used by one thread (the worker's event
loop): a few tens of microseconds, no fsync (WAL with `synchronous=NORMAL` fsyncs at
checkpoints). The ledger is rebuilt from the files at the first start of the cache (`rebuild`):
the files are the truth, the ledger an index of them.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ParamSpec, TypeVar

#: Changes kept in the log: a worker further behind than this reloads every row.
KEEP_CHANGES = 10_000
#: Seconds a worker keeps its hits before writing them to the LRU order.
TOUCH_SECONDS = 1.0
#: Seconds a writer waits for another's transaction (each is short) before failing.
BUSY_SECONDS = 5.0

P = ParamSpec("P")
T = TypeVar("T")


class LedgerError(OSError):
    """The ledger could not be read or written (a full disk, a damaged file, a writer that
    held it longer than `BUSY_SECONDS`): the one error every method raises."""


def _translated(method: Callable[P, T]) -> Callable[P, T]:
    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise LedgerError(errno.EIO, f"cache ledger: {exc}") from exc

    return call


_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    key TEXT PRIMARY KEY,
    data TEXT NOT NULL,
    cost INTEGER NOT NULL,
    used INTEGER NOT NULL,
    verified INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS objects_by_use ON objects (used);
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    data TEXT NOT NULL,
    stored INTEGER NOT NULL,
    owner TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reserved (owner TEXT PRIMARY KEY, bytes INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), stored INTEGER NOT
    NULL, clock INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0, 0);
"""


@dataclass(frozen=True, slots=True)
class Row:
    """One stored version as the ledger holds it."""

    key: str
    data: str
    """Its data file, relative to `objects/`."""
    cost: int
    verified: bool = True


@dataclass(frozen=True, slots=True)
class Change:
    seq: int
    key: str
    data: str
    stored: bool
    """True: this version was stored (replacing any other of the key); False: removed."""
    mine: bool
    """Made by this worker (its index already holds it)."""


class Ledger:
    @_translated
    def __init__(self, path: Path, owner: str) -> None:
        """`owner`: this worker's token (its row of reservations)."""
        self.path = path
        self.owner = owner
        # Opened on the cache's thread at startup, then used by the event loop's thread only:
        # never by two threads at once.
        self._db = sqlite3.connect(
            path, timeout=BUSY_SECONDS, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        # The WAL counts against the budget: checkpointed every ~400 KiB, kept under 1 MiB.
        self._db.execute("PRAGMA wal_autocheckpoint=100")
        self._db.execute("PRAGMA journal_size_limit=1048576")
        self._db.executescript(_SCHEMA)
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        self._count_fd = os.open(self._count_path(), flags, 0o600)
        try:
            if os.fstat(self._count_fd).st_size < 8:
                os.ftruncate(self._count_fd, 8)
            self._count = mmap.mmap(self._count_fd, 8)
        except BaseException:
            os.close(self._count_fd)
            raise
        self._seen = b""

    def _count_path(self) -> Path:
        return self.path.with_name(self.path.name + "-count")

    @_translated
    def close(self) -> None:
        try:
            self._db.close()
        finally:
            self._count.close()
            os.close(self._count_fd)

    def files(self) -> list[Path]:
        """The ledger's files on disk (counted against the budget)."""
        return [
            self.path,
            *(self.path.with_name(self.path.name + s) for s in ("-wal", "-shm", "-count")),
        ]

    # ---- reading --------------------------------------------------------------------------

    def changed(self) -> bool:
        """Whether a write (this worker's included) committed since the last call: the write
        counter moved (an 8-byte read of a shared map)."""
        count = self._count[0:8]
        if count == self._seen:
            return False
        self._seen = count
        return True

    @_translated
    def last_change(self) -> int:
        return int(self._db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0])

    @_translated
    def changes(self, after: int) -> list[Change] | None:
        """The changes after `after`, the last of each key only, in order; None when some
        were pruned (reload `rows`). A key whose last change is this worker's own is in its
        index as it should be; one whose last change is another's is to be applied."""
        with self._read():
            first = self._db.execute("SELECT MIN(seq) FROM changes").fetchone()[0]
            if first is not None and first > after + 1:
                return None
            rows = self._db.execute(
                "SELECT seq, key, data, stored, owner FROM changes WHERE seq > ? ORDER BY seq",
                (after,),
            ).fetchall()
        last: dict[str, Change] = {}
        for seq, key, data, stored, owner in rows:
            last.pop(key, None)
            last[key] = Change(seq, key, data, bool(stored), owner == self.owner)
        return list(last.values())

    @_translated
    def rows(self) -> tuple[list[Row], int]:
        """Every stored version, least recently used first, and the last change they
        include."""
        with self._read():
            rows = self._db.execute(
                "SELECT key, data, cost, verified FROM objects ORDER BY used"
            ).fetchall()
            last = self.last_change()
        return [Row(k, d, c, bool(v)) for k, d, c, v in rows], last

    @_translated
    def totals(self) -> tuple[int, int]:
        """(bytes of the stored versions, bytes reserved by fills in flight), all workers."""
        with self._read():
            stored = self._db.execute("SELECT stored FROM totals").fetchone()[0]
            reserved = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM reserved").fetchone()[
                0
            ]
        return int(stored), int(reserved)

    @_translated
    def row(self, key: str) -> Row | None:
        found = self._db.execute(
            "SELECT key, data, cost, verified FROM objects WHERE key = ?", (key,)
        ).fetchone()
        return None if found is None else Row(found[0], found[1], found[2], bool(found[3]))

    # ---- writing ----------------------------------------------------------------------------

    @_translated
    def rebuild(self, rows: Iterable[Row]) -> None:
        """Start over from the files (the first process to open the cache): the rows given,
        least recently used first; no change log, no reservation."""
        with self._write():
            self._db.execute("DELETE FROM objects")
            self._db.execute("DELETE FROM changes")
            self._db.execute("DELETE FROM reserved")
            total = 0
            used = 0
            for used, row in enumerate(rows, 1):
                self._db.execute(
                    "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
                    (row.key, row.data, row.cost, used, int(row.verified)),
                )
                total += row.cost
            self._db.execute("UPDATE totals SET stored = ?, clock = ?", (total, used))
            # The log starts after the rebuilt rows (a joining worker reads them as rows).
            self._db.execute("DELETE FROM sqlite_sequence WHERE name = 'changes'")

    @_translated
    def forget_owners(self, owners: Iterable[str]) -> None:
        """Drop the reservations of workers that are gone."""
        with self._write():
            self._db.executemany("DELETE FROM reserved WHERE owner = ?", [(o,) for o in owners])

    @_translated
    def owners(self) -> list[str]:
        return [o for (o,) in self._db.execute("SELECT owner FROM reserved").fetchall()]

    @_translated
    def set_reserved(self, amount: int) -> None:
        """This worker's fills in flight now reserve `amount` bytes."""
        with self._write():
            self._set_reserved(amount)

    @_translated
    def stored(self, row: Row, reserved: int) -> Row | None:
        """A version is stored (replacing the key's row, returned if it is another version's);
        this worker's reservations become `reserved`."""
        with self._write():
            old = self.row(row.key)
            self._put(row)
            self._set_reserved(reserved)
        return old if old is not None and old.data != row.data else None

    @_translated
    def removed(self, key: str, data: str) -> bool:
        """The version `data` of `key` left the index (evicted, purged, dropped, replaced);
        False when the ledger no longer held it (another worker removed or replaced it)."""
        with self._write():
            removed = self._remove(key, data)
        return removed

    @_translated
    def recount(self, key: str, data: str, cost: int) -> None:
        """A stored version's record was rewritten: it now costs `cost`."""
        with self._write():
            old = self.row(key)
            if old is not None and old.data == data:
                self._db.execute("UPDATE objects SET cost = ? WHERE key = ?", (cost, key))
                self._db.execute("UPDATE totals SET stored = stored + ?", (cost - old.cost,))

    @_translated
    def verified(self, key: str, data: str) -> None:
        with self._write():
            self._db.execute(
                "UPDATE objects SET verified = 1 WHERE key = ? AND data = ?", (key, data)
            )

    @_translated
    def touch(self, keys: Iterable[str]) -> None:
        """These keys were used, in this order (most recent last)."""
        with self._write():
            last = start = self._one("SELECT clock FROM totals")
            for last, key in enumerate(keys, start + 1):
                self._db.execute("UPDATE objects SET used = ? WHERE key = ?", (last, key))
            self._db.execute("UPDATE totals SET clock = ?", (last,))

    @_translated
    def reserve(
        self, more: int, reserved: int, limit: int, keep: str | None
    ) -> tuple[bool, list[Row]]:
        """Reserve `more` bytes for a fill of `keep` (this worker's reservations become
        `reserved + more`), evicting least recently used versions (not `keep`) until the
        stored bytes and every worker's reservations fit in `limit`. Returns whether it was
        reserved, and the rows evicted (their files are the caller's to remove). Nothing is
        evicted when the reservation cannot fit anyway."""
        with self._write():
            victims = self._victims(more, limit, keep)
            if victims is None:
                return False, []
            for victim in victims:
                self._remove(victim.key, victim.data)
            self._set_reserved(reserved + more)
        return True, victims

    @_translated
    def evict(self, limit: int, keep: str | None = None) -> list[Row]:
        """Evict least recently used versions until what is stored and reserved fits in
        `limit` (after a version was stored); the rows evicted."""
        with self._write():
            victims = self._victims(0, limit, keep) or []
            for victim in victims:
                self._remove(victim.key, victim.data)
        return victims

    # ---- inside a transaction ---------------------------------------------------------------

    def _victims(self, more: int, limit: int, keep: str | None) -> list[Row] | None:
        stored = self._db.execute("SELECT stored FROM totals").fetchone()[0]
        reserved = self._db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM reserved WHERE owner != ?", (self.owner,)
        ).fetchone()[0]
        mine = self._db.execute(
            "SELECT COALESCE(SUM(bytes), 0) FROM reserved WHERE owner = ?", (self.owner,)
        ).fetchone()[0]
        excess = stored + reserved + mine + more - limit
        if excess <= 0:
            return []
        victims: list[Row] = []
        for key, data, cost, verified in self._db.execute(
            "SELECT key, data, cost, verified FROM objects ORDER BY used"
        ):
            if key == keep:
                continue
            victims.append(Row(key, data, cost, bool(verified)))
            excess -= cost
            if excess <= 0:
                return victims
        return None if more else victims

    def _put(self, row: Row) -> None:
        old = self.row(row.key)
        clock = self._db.execute("UPDATE totals SET clock = clock + 1 RETURNING clock").fetchone()[
            0
        ]
        self._db.execute(
            "INSERT OR REPLACE INTO objects VALUES (?, ?, ?, ?, ?)",
            (row.key, row.data, row.cost, clock, int(row.verified)),
        )
        self._db.execute(
            "UPDATE totals SET stored = stored + ?", (row.cost - (old.cost if old else 0),)
        )
        self._log(row.key, row.data, True)

    def _remove(self, key: str, data: str) -> bool:
        old = self.row(key)
        if old is None or old.data != data:
            return False
        self._db.execute("DELETE FROM objects WHERE key = ?", (key,))
        self._db.execute("UPDATE totals SET stored = stored - ?", (old.cost,))
        self._log(key, data, False)
        return True

    def _log(self, key: str, data: str, stored: bool) -> None:
        seq = self._db.execute(
            "INSERT INTO changes (key, data, stored, owner) VALUES (?, ?, ?, ?) RETURNING seq",
            (key, data, int(stored), self.owner),
        ).fetchone()[0]
        if seq % 1000 == 0:
            self._db.execute("DELETE FROM changes WHERE seq <= ?", (seq - KEEP_CHANGES,))

    def _set_reserved(self, amount: int) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO reserved VALUES (?, ?)", (self.owner, max(0, amount))
        )

    def _one(self, sql: str, *args: object) -> int:
        return int(self._db.execute(sql, args).fetchone()[0])

    # ---- transactions -----------------------------------------------------------------------

    def _write(self) -> _Transaction:
        return _Transaction(self._db, "BEGIN IMMEDIATE", self._bump)

    def _read(self) -> _Transaction:
        return _Transaction(self._db, "BEGIN")

    def _bump(self) -> None:
        """A write committed: move the write counter (under its file's lock, so that two
        writers never both write the same next value: a reader that saw one could miss the
        other's commit)."""
        fcntl.flock(self._count_fd, fcntl.LOCK_EX)
        try:
            count = int.from_bytes(self._count[0:8], "little") + 1
            self._count[0:8] = (count % 2**64).to_bytes(8, "little")
        finally:
            fcntl.flock(self._count_fd, fcntl.LOCK_UN)


class _Transaction:
    __slots__ = ("_begin", "_committed", "_db")

    def __init__(
        self, db: sqlite3.Connection, begin: str, committed: Callable[[], None] | None = None
    ) -> None:
        self._db = db
        self._begin = begin
        self._committed = committed

    def __enter__(self) -> None:
        self._db.execute(self._begin)

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is not None:
            self._db.execute("ROLLBACK")
            return
        self._db.execute("COMMIT")
        if self._committed is not None:
            self._committed()


__all__ = ["BUSY_SECONDS", "KEEP_CHANGES", "TOUCH_SECONDS", "Change", "Ledger", "Row"]
