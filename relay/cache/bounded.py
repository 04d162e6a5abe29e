"""The cache's in-memory structures keyed by client input, bounded: a client choosing ever new
URLs makes the least recently used entries go, never the process grow.

Losing an entry costs at most one upstream request, never a wrong answer: a pass marker lost
means one more fill tries the object and learns it again; a Vary hint lost means the next
request fills the base key and learns the Vary again; a slice hint lost means a whole GET of a
sliced object is filled whole.

- `Lru`: a map of at most `max_entries` entries, the least recently set going first.
- `LruSet`: the same as a set.
- `Passes`: pass markers (a key is relayed, not stored, until its marker expires), expired ones
  pruned as new ones come.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import TypeVar

from relay.cache.clock import Clock

K = TypeVar("K")
V = TypeVar("V")

MiB = 1024 * 1024

#: At most this many pass markers are kept (an object's recent "not storable" verdict).
MAX_PASSES = 4096
#: The Vary index and the slice hints keep at least this many entries ...
MIN_HINTS = 4096
#: ... and this many per MiB of `cache_max_bytes`.
HINTS_PER_MIB = 4


def hints_bound(max_bytes: int) -> int:
    """How many entries the Vary index and the slice hints keep, for a cache budget."""
    return max(MIN_HINTS, HINTS_PER_MIB * (max_bytes // MiB))


class Lru(OrderedDict[K, V]):
    """A map of at most `max_entries` entries: setting one makes it the most recent, and the
    least recently set goes when there are too many."""

    def __init__(self, max_entries: int) -> None:
        super().__init__()
        self.max_entries = max_entries

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.max_entries:
            self.popitem(last=False)


class LruSet:
    """A set of at most `max_entries` members, the least recently added going first."""

    __slots__ = ("_members",)

    def __init__(self, max_entries: int) -> None:
        self._members: Lru[str, None] = Lru(max_entries)

    @property
    def max_entries(self) -> int:
        return self._members.max_entries

    def add(self, member: str) -> None:
        self._members[member] = None

    def update(self, members: Iterable[str]) -> None:
        for member in members:
            self.add(member)

    def discard(self, member: str) -> None:
        self._members.pop(member, None)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._members))


class Passes:
    """Pass markers: key -> until when (the clock's monotonic time) it is relayed, not stored.
    At most `max_entries`; expired markers are pruned as new ones are set."""

    __slots__ = ("_clock", "_until")

    def __init__(self, clock: Clock, max_entries: int | None = None) -> None:
        self._clock = clock
        self._until: Lru[str, float] = Lru(max_entries or MAX_PASSES)

    @property
    def max_entries(self) -> int:
        return self._until.max_entries

    def __len__(self) -> int:
        return len(self._until)

    def set(self, key: str, seconds: float) -> None:
        now = self._clock.monotonic()
        self._until[key] = max(now + seconds, self._until.get(key, 0.0))
        # The oldest markers come first: prune the expired ones there (amortized).
        for old, until in list(itertools.islice(self._until.items(), 8)):
            if until < now:
                del self._until[old]

    def active(self, key: str) -> bool:
        until = self._until.get(key)
        if until is None:
            return False
        if until < self._clock.monotonic():
            del self._until[key]
            return False
        return True

    def drop(self, key: str) -> None:
        self._until.pop(key, None)

    def drop_prefix(self, prefix: str) -> None:
        for key in [k for k in self._until if k.startswith(prefix)]:
            del self._until[key]


__all__ = ["HINTS_PER_MIB", "MAX_PASSES", "MIN_HINTS", "Lru", "LruSet", "Passes", "hints_bound"]
