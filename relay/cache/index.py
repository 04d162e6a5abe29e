"""Which objects are stored, least recently used first, and what they cost of the budget."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from relay.cache.bounded import Lru, hints_bound
from relay.cache.store import Meta


@dataclass(slots=True)
class Entry:
    key: str
    directory: Path
    meta: Meta
    parsed: object = field(default=None, compare=False, repr=False)
    """What the hit path derived from `meta` (its own type; made again when meta is replaced)."""

    @property
    def size(self) -> int:
        return self.meta.length


class Index:
    def __init__(self, max_bytes: int, hints: int | None = None) -> None:
        """`hints`: how many Vary hints are kept (default: `hints_bound(max_bytes)`)."""
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self.stored = 0
        """Bytes of complete objects."""
        self.reserved = 0
        """Bytes promised to fills in flight."""
        self.vary: Lru[str, str] = Lru(hints if hints is not None else hints_bound(max_bytes))
        """Base key -> "accept-encoding" for objects stored per encoding (bounded: keyed by
        client input; a lost hint costs one fill that learns it again)."""

    def __len__(self) -> int:
        return len(self._entries)

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
        """Add or replace; returns the replaced entry."""
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self.stored -= old.size
        self._entries[entry.key] = entry
        self.stored += entry.size
        return old

    def remove(self, key: str) -> Entry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.stored -= entry.size
        return entry

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return [key for key in self._entries if key.startswith(prefix)]

    def victims(self, needed: int, keep: str | None = None) -> list[Entry]:
        """Least recently used entries to remove so that `needed` more bytes fit."""
        out: list[Entry] = []
        excess = self.stored + self.reserved + needed - self.max_bytes
        for key, entry in self._entries.items():
            if excess <= 0:
                break
            if key == keep:
                continue
            out.append(entry)
            excess -= entry.size
        return out
