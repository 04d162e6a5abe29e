"""The head of an answer from a stored (or filling) response: its status line's headers, built
in one place (`head`) from the stored headers or from the hit path's `Parsed` encoding of them,
made once per stored response.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from relay.cache.index import Entry
from relay.cache.policy import Answer, freshness
from relay.cache.store import Meta, Store
from relay.proxy.headers import BODYLESS_STATUSES
from relay.types import RawHeaders

# Headers a 304 carries from the stored response (RFC 9110 15.4.5).
_NOT_MODIFIED_HEADERS = frozenset(
    {"cache-control", "content-location", "etag", "expires", "vary", "last-modified", "via"}
)


@dataclass(slots=True)
class Parsed:
    """What every hit of one stored response needs, derived once from its Meta (kept on the
    index Entry; a refreshed or replaced Meta is parsed again)."""

    meta: Meta
    headers: httpx.Headers
    must_revalidate: bool
    head: RawHeaders
    """The stored headers encoded for a 200 or 206 (Accept-Ranges added where it belongs);
    Content-Range, Content-Length, Age and Cache-Status are added per answer."""
    data: str
    """The object's data file."""


def parsed(entry: Entry) -> Parsed:
    """The entry's `Parsed` (made again when its meta was replaced)."""
    kept = entry.parsed
    meta = entry.meta
    if isinstance(kept, Parsed) and kept.meta is meta:
        return kept
    headers = httpx.Headers(meta.headers)
    made = Parsed(
        meta,
        headers,
        freshness(headers, 0.0, meta.lifetime).must_revalidate,
        _whole_head(meta),
        os.fspath(Store.data_path(entry)),
    )
    entry.parsed = made
    return made


def _whole_head(meta: Meta) -> RawHeaders:
    head = [(n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in meta.headers]
    if meta.status != 200:
        return head  # a fill's answer that is not stored, as the upstream said it
    if (meta.complete or meta.validator is not None) and not any(
        n == b"accept-ranges" for n, _ in head
    ):
        head.append((b"accept-ranges", b"bytes"))
    return head


def head(
    meta: Meta,
    reply: Answer,
    *,
    total: int,
    age: float,
    status: str,
    whole: RawHeaders | None = None,
    adapt: Callable[[RawHeaders], RawHeaders] | None = None,
) -> RawHeaders:
    """The head of an answer from a stored (or filling) response: its headers for `reply`
    (a 304 keeps only what RFC 9110 15.4.5 lists; a 416 drops the representation's type),
    then Content-Range / Content-Length of the reply, `adapt`, Age and Cache-Status.
    `whole`: the stored headers already encoded for a 200/206 (`Parsed.head`). A fill's
    answer that is not stored keeps its own status (`meta.status`) and headers."""
    code = reply.status
    if code == 200 or code == 206 or code == meta.status:
        headers = whole.copy() if whole is not None else _whole_head(meta)
        if code == 206 and code != meta.status:
            headers.append(
                (b"content-range", f"bytes {reply.start}-{reply.stop - 1}/{total}".encode())
            )
        if reply.stop >= 0 and code not in BODYLESS_STATUSES:
            headers.append((b"content-length", str(reply.stop - reply.start).encode()))
    elif code == 416:
        headers = [
            (n, v) for n, v in _whole_head(meta) if n not in (b"content-type", b"content-encoding")
        ]
        headers.append((b"content-range", f"bytes */{total}".encode()))
        headers.append((b"content-length", b"0"))
    else:
        headers = [
            (name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in meta.headers
            if name.lower() in _NOT_MODIFIED_HEADERS
        ]
    if adapt is not None:
        headers = adapt(headers)
    headers.append((b"age", str(int(age)).encode()))
    headers.append((b"cache-status", status.encode()))
    return headers
