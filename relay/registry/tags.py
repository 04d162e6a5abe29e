"""What relay knows of tags: tag -> the digest, media type and length the upstream last
named, per (route, repository, tag, the request's normalised Accept), and when it said so.

A tag's manifest body is stored by its digest (content-addressed, like a blob); a tag's answer
only says which digest it names. A tag is fresh for its route's `tag_max_age`; then a `HEAD`
upstream checks it (`Docker-Content-Digest`): the same digest refreshes it without a GET (an
unchanged tag costs no GET against rate limits), another one moves it. When that check fails
(the upstream unreachable, a 5xx, a 429), the tag known is answered stale.

Each tag's answer is a record in the cache (`relay.cache.records`), keyed by the route's own
path of the tag plus the normalised Accept (`Tags.key`: nothing else a client sends): durable
(it survives a restart, so a tag still pulls with the upstream down), counted in the cache's
budget and evicted like any object (which bounds it), dropped by a purge of the tag's path or
a prefix of it, shared by whatever shares the cache.

Never back to an older digest: when a tag moves, its old record is dropped before the new one
is written (if that write fails, the tag is unknown, never answered with the old digest); the
time of a record is when its HEAD was sent, and a record is stored only if none newer is
(HEADs whose answers cross: the later-sent one stands).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from relay.cache.cache import Cache
from relay.cache.clock import Clock
from relay.cache.index import Entry
from relay.cache.key import base_key
from relay.cache.records import store_record
from relay.cache.store import Meta
from relay.config import Route

#: Marks a tag's record key (after the key of the tag's path on its route).
TAG_MARK = "\x00oci-tag accept="
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
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


@dataclass(frozen=True, slots=True)
class TagEntry:
    digest: str
    """`sha256:<hex>`."""
    media_type: str
    length: int
    checked: float
    """Wall-clock time the upstream's last word on this tag was asked for (its HEAD sent)."""


class Tags:
    """Tags' answers, kept as records in the cache (see the module)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock

    @staticmethod
    def key(route: Route, name: str, tag: str, accept: str) -> str:
        """The record key: the tag's path on its route (as relay's purge names it), then
        the normalised Accept."""
        path = f"{route.prefix}v2/{name}/manifests/{tag}"
        return base_key(route.prefix, path.encode("latin-1"), b"") + TAG_MARK + accept

    def now(self) -> float:
        return self._clock.now()

    @staticmethod
    def get(cache: Cache, key: str) -> TagEntry | None:
        entry = cache.lookup(key, "identity")
        return None if entry is None else _tag_of(entry)

    def ttl(self, entry: TagEntry, route: Route) -> float:
        """Seconds `entry` stays fresh (negative: stale since)."""
        return route.tag_max_age - (self._clock.now() - entry.checked)

    async def set(
        self, cache: Cache, key: str, route: Route, url: str, answer: TagEntry
    ) -> TagEntry:
        """Keep `answer` (its `checked`: when its HEAD was sent) as the tag's record; the
        tag's answer from now on (a newer one already stored stands instead)."""
        stored = cache.index.peek(key)
        current = None if stored is None else _tag_of(stored)
        if current is not None and current.checked > answer.checked:
            return current  # a HEAD sent later has answered already
        if current is not None and stored is not None and _same(current, answer):
            # Unchanged: the record's time moves on (its record rewritten, nothing else).
            stored.meta = dataclasses.replace(stored.meta, stored_at=answer.checked)
            stored.parsed = None
            cache.rewrite_metas([stored])
            return answer
        if current is not None:
            cache.drop(key)  # never answered again, whether or not the new one is stored
        meta = Meta(
            key=key,
            url=url,
            headers=[],
            length=0,
            stored_at=answer.checked,
            initial_age=0.0,
            lifetime=route.tag_max_age,
            extra={
                "oci-tag-digest": answer.digest,
                "oci-tag-type": answer.media_type,
                "oci-tag-length": str(answer.length),
            },
        )
        await store_record(cache, key, route, meta, keep=lambda now: _older(now, answer))
        return answer

    @staticmethod
    def drop(cache: Cache, key: str) -> None:
        cache.drop(key)


def _same(a: TagEntry, b: TagEntry) -> bool:
    return (a.digest, a.media_type, a.length) == (b.digest, b.media_type, b.length)


def _older(stored: Entry | None, answer: TagEntry) -> bool:
    """Whether `answer` may replace the record `stored`: none, or one not newer."""
    return stored is None or stored.meta.stored_at <= answer.checked


def _tag_of(entry: Entry) -> TagEntry | None:
    """The tag answer a record holds; None when it holds none (not a tag's record)."""
    extra = entry.meta.extra
    digest = extra.get("oci-tag-digest", "")
    length = extra.get("oci-tag-length", "")
    if not _DIGEST.fullmatch(digest) or not (length.isascii() and length.isdigit()):
        return None
    return TagEntry(digest, extra.get("oci-tag-type", ""), int(length), entry.meta.stored_at)
