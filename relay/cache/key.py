"""The cache key: route prefix + raw path + query, plus the encoding variant when the upstream
says `Vary: Accept-Encoding`; an index page of a pypi/npm preset route is keyed by its
negotiated form too (`index_key`)."""

from __future__ import annotations

import hashlib


def base_key(route_prefix: str, raw_path: bytes, query: bytes) -> str:
    key = route_prefix + "\x00" + raw_path.decode("latin-1")
    if query:
        key += "?" + query.decode("latin-1")
    return key


def path_of(base: str, route_prefix: str) -> str:
    """The request path below the route's prefix (with its query) that `base` was made from."""
    raw = base.partition("\x00")[2]
    return raw[len(route_prefix) :] if raw.startswith(route_prefix) else raw


def encoding_variant(accept_encoding: str | None) -> str:
    """The request's Accept-Encoding, normalised: codings lowercased, sorted, q=0 dropped."""
    if not accept_encoding:
        return "identity"
    codings = set()
    for item in accept_encoding.split(","):
        name, _, params = item.strip().partition(";")
        name = name.strip().lower()
        q = params.replace(" ", "").lower()
        if name and q not in ("q=0", "q=0.0", "q=0.00", "q=0.000"):
            codings.add(name)
    return ",".join(sorted(codings)) or "identity"


#: Marks the key of a preset route's index page: the form the request's Accept selects is part
#: of the key, so the page's `Vary: Accept` (and `Accept-Encoding`: these routes always ask the
#: upstream for identity) is covered by the key itself.
INDEX_MARK = "\x00accept="


def index_key(base: str, accept: str) -> str:
    """The key of a preset route's index page as asked with `accept` (see
    `relay.net.presets.index_accept`)."""
    return base + INDEX_MARK + accept


#: Marks the key of one encoding variant of an object stored per encoding.
VARIANT_MARK = "\x00ae="


def variant_key(base: str, variant: str) -> str:
    return base + VARIANT_MARK + variant


def digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def slice_key(key: str, index: int | str) -> str:
    """The key of one aligned slice of the object stored under `key` (as nginx's slice
    module does: each slice cached on its own)."""
    return key + SLICE_MARK + str(index)


SLICE_MARK = "\x00slice="
