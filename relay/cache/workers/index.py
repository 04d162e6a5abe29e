"""The index of one worker when several share the cache: `Index`, kept in step with the ledger.

Each worker keeps its own in-memory `Index` (lookups stay a dict access), and every change it
makes to the stored versions is also written to the ledger (`relay.cache.workers.ledger`):
`add` (a version stored), `remove` (evicted, purged, dropped), `recount`, its reservations.
Before a lookup the cache calls `sync`: the changes other workers made since the last one are
applied (asked of the ledger only when SQLite says another connection wrote), so an object
stored, evicted, purged or replaced by one worker is seen by every worker's next request.

The budget is the ledger's, not this index's: `used` and `on_disk` are every worker's stored
versions and reservations plus the shared directories and files (`overhead`), and `victims`
and `reserve` choose least recently used versions across all workers. A version another
worker stored or removed is *foreign* here: its files are never removed by this worker when
it leaves this index (the worker that removed it from the ledger removes them); a version
this worker evicts or replaces in the ledger is removed by it, even one it never loaded.

Hits are counted here and written to the ledger's LRU order at most every `TOUCH_SECONDS`
(and before any eviction), so the order is shared to within that delay.

When the ledger cannot be read or written (`LedgerError`: a full disk, a damaged file), the
worker goes on with its own index (a warning every `WARN_EVERY` seconds): a reservation
then finds no room (nothing more is stored), what other workers change is seen once the
ledger answers again, and the ledger is rebuilt from the files at the server's next start.

Limits (documented in docs/cache.md): versions readers of another worker hold when they are
evicted are not counted (`lingering` is per worker: a reader's descriptor keeps the bytes on
disk until it is done); a worker that looked an object up just before another evicted it
answers that request as a miss if the file is gone before it opens it (`relay.cache.serve`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from relay.cache.index import Entry, Index
from relay.cache.key import VARIANT_MARK
from relay.cache.store import Malformed, Meta, Store, decode
from relay.cache.workers.ledger import TOUCH_SECONDS, Change, Ledger, LedgerError, Row

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between two warnings that the ledger failed (a full disk fails every write).
WARN_EVERY = 10.0


class LedgerIndex(Index):
    def __init__(
        self,
        max_bytes: int,
        overhead: Callable[[], int],
        ledger: Ledger,
        store: Store,
        monotonic: Callable[[], float],
        measured: Callable[[], int] | None = None,
    ) -> None:
        """`overhead`: the shared directories and files as the budget counts them (measured
        at most every second); `measured`: the same measured now (for `on_disk`, what a
        scrape reports)."""
        self.ledger = ledger
        self._mine = 0
        """What this worker's fills in flight reserved (the ledger holds every worker's)."""
        super().__init__(max_bytes, overhead)
        self.store = store
        self._measured = measured or overhead
        self._monotonic = monotonic
        self.seq = 0
        """The last ledger change this index holds."""
        self._touched: dict[str, None] = {}
        """Keys hit since the last `flush`, least recent first (at most one per entry)."""
        self._flushed = monotonic()
        self._warned: float | None = None
        self.remove_files: Callable[[Entry], None] = lambda entry: None
        """Removes a version's files (the cache's `remove_files`): for versions this worker
        removes from the ledger without holding them in its index."""
        self.learned: Callable[[Entry], None] = lambda entry: None
        """Called with each version learned from another worker (the cache's hints)."""

    # ---- loading and syncing --------------------------------------------------------------

    def load(self, entry: Entry) -> None:
        """Hold a version the ledger already records (at startup)."""
        super().add(entry)

    def sync(self) -> None:
        """Apply what other workers changed since the last call."""
        if self._touched and self._monotonic() - self._flushed > TOUCH_SECONDS:
            self.flush()
        self._quietly("sync", self._sync, None)

    def _sync(self) -> None:
        if not self.ledger.changed():
            return
        changes = self.ledger.changes(self.seq)
        if changes is None:
            self._reload()
            return
        for change in changes:
            self.seq = max(self.seq, change.seq)
            if not change.mine:
                self._apply(change)

    def _apply(self, change: Change) -> None:
        current = self.peek(change.key)
        if change.stored:
            if current is not None and current.data.name == Path(change.data).name:
                return
            row = self.ledger.row(change.key)
            if row is None or row.data != change.data:
                return  # replaced or removed since: a later change says so
            entry = self._entry(row)
            if entry is None:
                return
            if current is not None:
                self._forget(current)
            self._learn(entry)
        elif current is not None and current.data.name == Path(change.data).name:
            self._forget(current)

    def _reload(self) -> None:
        rows, self.seq = self.ledger.rows()
        keep = {row.key: row for row in rows}
        for entry in self.entries():
            row = keep.get(entry.key)
            if row is None or row.data != self._relative(entry.data):
                self._forget(entry)
        for row in rows:
            if self.peek(row.key) is None:
                loaded = self._entry(row)
                if loaded is not None:
                    self._learn(loaded)

    def _learn(self, entry: Entry) -> None:
        """Hold a version another worker stored, with the hints a stored version gives (as
        at load): its Vary, and `learned` (the cache's slices)."""
        super().add(entry)
        if entry.meta.vary == "accept-encoding":
            self.vary[entry.key.rsplit(VARIANT_MARK, 1)[0]] = "accept-encoding"
        self.learned(entry)

    def _forget(self, entry: Entry) -> None:
        """`entry` left the ledger by another worker's hand: out of this index; its files
        are not this worker's to remove (`Entry.foreign`)."""
        super().remove(entry.key)
        entry.foreign = True
        self.retire(entry)

    def _entry(self, row: Row) -> Entry | None:
        """The version a ledger row names, its record read from disk (a few KiB, on the
        loop: as a hit's small read is); None when it is gone or unreadable."""
        data = self.store.objects / row.data
        try:
            meta = decode(data.with_suffix(".meta").read_bytes(), data.name)
        except (OSError, Malformed):
            return None
        entry = Entry(meta.key, data, meta, row.cost)
        entry.verified = row.verified or meta.sha256 is None
        return entry

    def _relative(self, data: Path) -> str:
        return f"{data.parent.name}/{data.name}"

    def row_of(self, entry: Entry) -> Row:
        return Row(entry.key, self._relative(entry.data), entry.cost, entry.verified)

    # ---- changes this worker makes --------------------------------------------------------

    def get(self, key: str) -> Entry | None:
        entry = super().get(key)
        if entry is not None:
            touched = self._touched
            touched.pop(key, None)
            touched[key] = None
        return entry

    def add(self, entry: Entry) -> Entry | None:
        replaced = super().add(entry)
        old = self._quietly(
            "store", lambda: self.ledger.stored(self.row_of(entry), self._mine), None
        )
        if old is not None and (replaced is None or self._relative(replaced.data) != old.data):
            self.remove_files(_unloaded(old, self.store))
        return replaced

    def published(self, entry: Entry, released: int) -> Entry | None:
        """A fill published `entry`, the end of its `released` bytes of reservation: both
        written in the one ledger transaction of `add`."""
        self._mine -= released
        return self.add(entry)

    def remove(self, key: str) -> Entry | None:
        entry = super().remove(key)
        if entry is not None and not entry.foreign:
            data = self._relative(entry.data)
            self._quietly("remove", lambda: self.ledger.removed(key, data), False)
        return entry

    def recount(self, entry: Entry, cost: int) -> None:
        super().recount(entry, cost)
        if self.peek(entry.key) is entry:
            data = self._relative(entry.data)
            self._quietly("recount", lambda: self.ledger.recount(entry.key, data, cost), None)

    def flush(self) -> None:
        """Write the hits counted since the last flush to the ledger's LRU order."""
        touched, self._touched = self._touched, {}
        self._flushed = self._monotonic()
        if touched:
            self._quietly("touch", lambda: self.ledger.touch(touched), None)

    # ---- the budget, every worker's ---------------------------------------------------------

    @property
    def reserved(self) -> int:
        return self._mine

    @reserved.setter
    def reserved(self, value: int) -> None:
        if value != self._mine:
            self._mine = value
            self._quietly("reserve", lambda: self.ledger.set_reserved(value), None)

    @property
    def on_disk(self) -> int:
        """Every worker's stored versions, the directories and shared files, and the
        versions this worker's readers hold (a scrape reads it: the index is synced first,
        so the object count read next is every worker's too)."""
        self.sync()
        stored, _ = self._totals()
        return stored + self.lingering + self._measured()

    @property
    def used(self) -> int:
        stored, reserved = self._totals()
        return stored + reserved + self.lingering + self.overhead()

    def _totals(self) -> tuple[int, int]:
        """Every worker's (stored, reserved); this worker's own when the ledger fails."""
        return self._quietly("read", self.ledger.totals, (self.stored, self._mine))

    def victims(self, needed: int, keep: str | None = None) -> list[Entry]:
        """Evict (in the ledger) least recently used versions of any worker until `needed`
        more bytes fit; the versions evicted, to be removed by the caller (`Cache._evict`)."""
        self.flush()
        limit = self._limit() - needed
        none: list[Row] = []
        rows = self._quietly("evict", lambda: self.ledger.evict(limit, keep), none)
        return [self._victim(row) for row in rows]

    def reserve(self, key: str, more: int) -> tuple[bool, list[Entry]]:
        """Reserve `more` bytes for a fill of `key`, evicting least recently used versions
        of any worker in the same ledger transaction; whether it fits, and the evicted."""
        self.flush()
        limit = self._limit()
        failed: tuple[bool, list[Row]] = (False, [])
        ok, rows = self._quietly(
            "reserve", lambda: self.ledger.reserve(more, self._mine, limit, key), failed
        )
        if ok:
            self._mine += more
        return ok, [self._victim(row) for row in rows]

    def _quietly(self, what: str, call: Callable[[], T], default: T) -> T:
        """`call()`, or `default` when the ledger fails (a warning, at most every
        `WARN_EVERY` seconds)."""
        try:
            return call()
        except LedgerError as exc:
            now = self._monotonic()
            if self._warned is None or now - self._warned >= WARN_EVERY:
                self._warned = now
                logger.warning("cache: the ledger failed (%s): %s", what, exc.strerror)
            return default

    def _limit(self) -> int:
        return self.max_bytes - self.overhead() - self.lingering

    def _victim(self, row: Row) -> Entry:
        """The version a ledger row names, as this index holds it (or as a bare entry, for
        its files to be removed)."""
        entry = self.peek(row.key)
        if entry is not None and self._relative(entry.data) == row.data:
            return entry
        return _unloaded(row, self.store)


def _unloaded(row: Row, store: Store) -> Entry:
    """A version this worker does not hold in its index, to remove its files."""
    meta = Meta(
        key=row.key,
        url=row.key,
        headers=[],
        length=0,
        stored_at=0.0,
        initial_age=0.0,
        lifetime=0.0,
    )
    return Entry(row.key, store.objects / row.data, meta, row.cost)


__all__ = ["LedgerIndex"]
