"""Which objects are stored, least recently used first, and what they cost of the budget.

An `Entry` is one stored version of an object. A reader pins the version it answers from
(`pin`, taken when it looks the entry up, before any await) and unpins it when done: when the
entry leaves the index (replaced by a newer version, evicted, purged) its files are removed at
once if no reader holds it (`retire` says so), else at its last `unpin`; meanwhile they still
count against the budget (`lingering`).

The budget counts the disk: stored versions' `cost` (block-rounded data and metadata), the
versions readers still hold, what fills in flight reserved, and the directories (`overhead`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from relay.cache.bounded import Lru, hints_bound
from relay.cache.store import Meta


@dataclass(slots=True)
class Entry:
    key: str
    data: Path
    """The version's data file (its own name: never renamed over, never truncated)."""
    meta: Meta
    cost: int = 0
    """What the version takes on disk (`Store.cost`)."""
    parsed: object = field(default=None, compare=False, repr=False)
    """What the hit path derived from `meta` (its own type; made again when meta is replaced)."""
    pins: int = field(default=0, compare=False)
    """Readers answering from this version now."""
    retired: bool = field(default=False, compare=False)
    """Out of the index: its files go when the last reader unpins."""
    verified: bool = True
    """False: loaded from disk with a known digest and not hashed since
    (`relay.cache.integrity`); no answer takes its bytes as they are."""
    corrupt: bool = False
    """Its bytes were found not to match its digest: dropped, and answers reading it abort."""
    foreign: bool = field(default=False, compare=False)
    """With several workers: it left this index because another worker removed it from the
    ledger; that worker removes its files, this one never does."""

    @property
    def size(self) -> int:
        return self.meta.length


def _no_overhead() -> int:
    return 0


class Index:
    def __init__(
        self,
        max_bytes: int,
        overhead: Callable[[], int] = _no_overhead,
        hints: int | None = None,
    ) -> None:
        """`overhead`: the disk bytes of the cache's directories (`Store.directory_bytes`);
        `hints`: how many Vary hints are kept (default: `hints_bound(max_bytes)`)."""
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.stored = 0
        """Disk bytes of the stored versions in the index."""
        self.lingering = 0
        """Disk bytes of versions out of the index that readers still hold."""
        self.reserved = 0
        """Disk bytes promised to fills in flight."""
        self.overhead = overhead
        """Disk bytes of the directories."""
        self.vary: Lru[str, str] = Lru(hints if hints is not None else hints_bound(max_bytes))
        """Base key -> "accept-encoding" for objects stored per encoding (bounded: keyed by
        client input; a lost hint costs one fill that learns it again)."""

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def on_disk(self) -> int:
        """What the cache's files and directories take on disk now (fills in flight aside)."""
        return self.stored + self.lingering + self.overhead()

    @property
    def used(self) -> int:
        """What counts against `max_bytes`: the disk, and what fills in flight reserved."""
        return self.on_disk + self.reserved

    def get(self, key: str) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def peek(self, key: str) -> Entry | None:
        """The entry, without counting it as used."""
        return self._entries.get(key)

    def entries(self) -> list[Entry]:
        return list(self._entries.values())

    def add(self, entry: Entry) -> Entry | None:
        """Add or replace; returns the replaced entry (to be retired)."""
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self.stored -= old.cost
        self._entries[entry.key] = entry
        self.stored += entry.cost
        return old

    def remove(self, key: str) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stored -= entry.cost
        return entry

    def recount(self, entry: Entry, cost: int) -> None:
        """`entry`'s record was rewritten: it now takes `cost` on disk."""
        if self._entries.get(entry.key) is entry:
            self.stored += cost - entry.cost
        entry.cost = cost

    # ---- readers --------------------------------------------------------------------------

    @staticmethod
    def pin(entry: Entry) -> None:
        entry.pins += 1

    def unpin(self, entry: Entry) -> bool:
        """A reader is done with `entry`: True when its files are to be removed now (it was
        retired and this was its last reader)."""
        entry.pins -= 1
        if entry.pins or not entry.retired or entry.foreign:
            return False
        self.lingering -= entry.cost
        return True

    def retire(self, entry: Entry) -> bool:
        """`entry` (removed or replaced) leaves the index for good: True when its files are to
        be removed now, False when a reader holds it (then at its last `unpin`)."""
        if entry.retired:
            return False
        entry.retired = True
        if entry.foreign:
            return False
        if entry.pins:
            self.lingering += entry.cost
            return False
        return True

    # ---- the budget -----------------------------------------------------------------------

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [key for key in self._entries if key.startswith(prefix)]

    def victims(self, needed: int, keep: str | None = None) -> list[Entry]:
        """Least recently used entries to remove so that `needed` more bytes fit."""
        out: list[Entry] = []
        excess = self.used + needed - self.max_bytes
        for key, entry in self._entries.items():
            if excess <= 0:
                break
            if key == keep:
                continue
            out.append(entry)
            if not entry.pins:  # a version a reader holds frees its disk only later
                excess -= entry.cost
        return out
