"""The response heads relay gives registry answers: exactly the registry's headers, whatever
the bytes' source (the registry, object storage behind a redirect, the cache).

Blobs: `Content-Type: application/octet-stream`, `Docker-Content-Digest` and a strong ETag of
the digest, with the length (and range) of this answer. Manifests: the manifest's own
`Content-Type`, its digest (the one asked for or named by the tag; a relayed tag's from the
upstream when it gives a valid one). Tag lists and referrers: their content type, a tags
list's `Link` pointing back at relay's own path. Everything else the upstream or object
storage sent (its ETags, `x-amz-*`, cookies, caching headers) is left out.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from relay.registry.errors import API_VERSION, API_VERSION_HEADER
from relay.registry.names import RegistryRequest, tags_query_of_link
from relay.types import RawHeaders

_API = (API_VERSION_HEADER.lower().encode(), API_VERSION.encode())
#: Per-answer headers kept from whoever made the head (lengths, ranges, relay's own).
_KEPT = frozenset(
    {b"content-length", b"content-range", b"accept-ranges", b"via", b"age", b"cache-status"}
)
_DIGEST = re.compile(rb"sha256:[0-9a-f]{64}")
_LINK = re.compile(r'<([^>]*)>\s*;\s*rel="?next"?')

Adapt = Callable[[RawHeaders], RawHeaders]


def _kept(headers: RawHeaders, also: frozenset[bytes] = frozenset()) -> RawHeaders:
    return [(n, v) for n, v in headers if n in _KEPT or n in also]


def blob_head(digest: str) -> Adapt:
    value = digest.encode()

    def adapt(headers: RawHeaders) -> RawHeaders:
        return [
            *_kept(headers),
            (b"content-type", b"application/octet-stream"),
            (b"docker-content-digest", value),
            (b"etag", b'"' + value + b'"'),
            _API,
        ]

    return adapt


def manifest_head(digest: str | None) -> Adapt:
    """A manifest's head; `digest` None: the upstream's `Docker-Content-Digest` (a tag
    relayed without the cache), when it is a valid sha256 digest."""

    def adapt(headers: RawHeaders) -> RawHeaders:
        value = digest.encode() if digest else _upstream_digest(headers)
        out = _kept(headers, frozenset({b"content-type"}))
        if value is not None:
            out += [(b"docker-content-digest", value), (b"etag", b'"' + value + b'"')]
        return [*out, _API]

    return adapt


def listing_head(request: RegistryRequest) -> Adapt:
    """A tags list's or referrers' head: its type, and a tags list's next-page `Link` mapped
    onto the client's own path (only its checked `n` and `last` carried over)."""

    def adapt(headers: RawHeaders) -> RawHeaders:
        out = _kept(headers, frozenset({b"content-type"}))
        link = next((v for n, v in headers if n == b"link"), None)
        if link is not None and request.kind == "tags":
            mapped = _next_link(link.decode("latin-1"), request)
            if mapped:
                out.append((b"link", mapped.encode("ascii")))
        return [*out, _API]

    return adapt


def _next_link(link: str, request: RegistryRequest) -> str | None:
    match = _LINK.search(link)
    if match is None:
        return None
    query = tags_query_of_link(match.group(1))
    if query is None:
        return None
    if request.ns:
        query += f"&ns={request.ns}"
    return f'<{request.path}?{query}>; rel="next"'


def _upstream_digest(headers: RawHeaders) -> bytes | None:
    for name, value in headers:
        if name == b"docker-content-digest" and _DIGEST.fullmatch(value.strip()):
            return value.strip()
    return None
