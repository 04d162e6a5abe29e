"""What relay knows of tags: tag -> the digest, media type and length the upstream last
named, per (route, repository, tag, the request's normalised Accept), and when it said so.

A tag's manifest body is stored by its digest (content-addressed, like a blob); this map only
says which digest a tag names. A tag is fresh for its route's `tag_max_age`; then a `HEAD`
upstream checks it (`Docker-Content-Digest`): the same digest refreshes it without a GET (an
unchanged tag costs no GET against rate limits), another one moves it. When that check fails
(the upstream unreachable, a 5xx, a 429), the tag known is answered stale.

The map is in memory and keyed by client input: bounded (`MAX_TAGS`, least recently set
first). It does not survive a restart: after one, each tag is checked with a HEAD again (the
manifests and blobs stay stored by digest).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.cache.bounded import Lru
from relay.cache.clock import Clock
from relay.config import Route

MAX_TAGS = 16384
#: At most this many media ranges of an Accept are kept in a tag's key.
MAX_ACCEPT_TYPES = 16
_MEDIA_RANGE = re.compile(
    r"(?:\*/\*|[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/(?:\*|[a-z0-9][a-z0-9!#$&^_.+-]{0,126}))"
)

#: Every manifest media type: what a manifest is asked for with when its digest is known.
MANIFEST_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.oci.artifact.manifest.v1+json",
)


def normalised_accept(value: str | None) -> str:
    """An Accept reduced to what selects a manifest's form: its media ranges, lowercased,
    without parameters, each once, sorted (clients send the same set in different orders);
    at most `MAX_ACCEPT_TYPES`. Registries pick a form from the set, not the order."""
    kept: set[str] = set()
    for item in (value or "").split(","):
        media = item.split(";", 1)[0].strip().lower()
        if _MEDIA_RANGE.fullmatch(media):
            kept.add(media)
    return ",".join(sorted(kept)[:MAX_ACCEPT_TYPES])


@dataclass(slots=True)
class TagEntry:
    digest: str
    """`sha256:<hex>`."""
    media_type: str
    length: int
    checked: float
    """The clock's monotonic time of the upstream's last word on this tag."""


TagKey = tuple[str, str, str, str]


class Tags:
    def __init__(self, clock: Clock, max_entries: int = MAX_TAGS) -> None:
        self._clock = clock
        self._entries: Lru[TagKey, TagEntry] = Lru(max_entries)

    @staticmethod
    def key(route: Route, name: str, tag: str, accept: str) -> TagKey:
        return (route.prefix, name, tag, accept)

    def get(self, key: TagKey) -> TagEntry | None:
        return self._entries.get(key)

    def ttl(self, entry: TagEntry, route: Route) -> float:
        """Seconds `entry` stays fresh (negative: stale since)."""
        return route.tag_max_age - (self._clock.monotonic() - entry.checked)

    def set(self, key: TagKey, digest: str, media_type: str, length: int) -> TagEntry:
        entry = TagEntry(digest, media_type, length, self._clock.monotonic())
        self._entries[key] = entry
        return entry

    def drop(self, key: TagKey) -> None:
        self._entries.pop(key, None)

    def __len__(self) -> int:
        return len(self._entries)
