"""What a fill does with the upstream's answer (sans-IO): store it whole, store it as a slice,
answer its clients without storing it (and why), keep it open for one client, or close it; and
the headers and record (`Meta`) kept with what it stores.

The rules (RFC 9111 3, by `relay.cache.policy`) read the answer's headers as the storage rules
see them (`rules`): an index page's Vary names its key covers (Accept, Accept-Encoding) removed.
An answer not stored goes through the fill's partial file like any other and is never published;
whom it answers:
- "all" (every client holding the fill shares it: an error, a redirect, `no-store`...);
- "one" (meant for one client: `private`, `Set-Cookie`: the first that claims it);
- "none" (each client relayed on its own): it varies on request headers the fill does not send
  as a client would (`Vary` beyond the key), an index page relay cannot rewrite, a
  content-addressed object's refusal, a Content-Range on a 200.
One the partial file cannot hold from its head on (a Content-Length over the object limit or the
budget) is kept open for the first GET that takes it, to relay and close.

Room in the budget is asked through `room` (the cache's reservation, which may evict): nothing
here touches a file or the network.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import httpx

from relay.cache.key import INDEX_MARK, VARIANT_MARK
from relay.cache.policy import (
    for_one_client,
    freshness_lifetime,
    initial_age,
    not_storable,
    updated_headers,
    vary_of,
)
from relay.cache.store import Meta
from relay.config import Route
from relay.http.continuation import content_length
from relay.http.digests import DigestConflict, upstream_sha256
from relay.http.ranges import ContentRange, parse_content_range
from relay.http.validators import resume_validator
from relay.net.presets import is_index_type, linked_sha256
from relay.net.redirects import REDIRECT_STATUSES, rewrite_location_headers
from relay.net.routing import RouteTable
from relay.proxy.headers import BODYLESS_STATUSES, downstream_response_headers

#: Response headers not kept with a stored object (recomputed for each answer).
_NOT_STORED = frozenset({b"content-length", b"age", b"content-range"})

VARY_LEARNED = "varies on Accept-Encoding"
#: Why an object over `cache_max_object_bytes` is not stored (whole or as slices).
TOO_LARGE = "too large"
#: Why an answer is not stored, when it can answer none of the fill's clients either: relay
#: refuses it (an index page it cannot rewrite, a Content-Range on a 200).
_ANSWERS_NONE = frozenset({"encoded index page", "partial index page", "content-range on a 200"})
#: Why an answer is not stored, when the partial file cannot hold it either.
_TOO_BIG = frozenset({TOO_LARGE, "no room"})

Answers = Literal["all", "one", "none"]
Action = Literal["store", "answer", "keep_open", "close"]


@dataclass(frozen=True, slots=True)
class Whole:
    """What a fill of a whole object does with the upstream's answer."""

    action: Action
    """"store": written and published; "answer": written for its clients, not published;
    "keep_open": kept open for the first client that takes it; "close": nobody to answer."""
    reason: str | None
    """Why it is not stored (None: stored)."""
    answers: Answers
    """Whom an answer not stored answers ("all" when stored)."""
    length: int | None
    """The body length the partial file holds (None: unsized)."""
    rules: httpx.Headers
    """The headers the storage rules read."""


@dataclass(frozen=True, slots=True)
class Slice:
    """What a slice fill does with the upstream's answer to its Range request."""

    reason: str | None
    """Why it is not stored (None: stored)."""
    passes_object: bool = False
    """The reason is the object's own (not storable, too large), not this slice's."""
    content_range: ContentRange | None = None
    validator: str | None = None
    """The answer's strong validator."""
    content_sha256: str | None = None
    """The SHA-256 the 206's Content-Digest announces for its bytes."""
    whole_sha256: str | None = None
    """The whole object's digest, checked once every slice is stored."""
    length: int = 0


def stored_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in downstream_response_headers(raw, 200)
        if name not in _NOT_STORED
    ]


def answer_headers(response: httpx.Response, routes: RouteTable) -> list[tuple[str, str]]:
    """The headers of an answer that is not stored, as its clients get them: a 200's as if
    stored; another status's as relayed (its Content-Range kept, a redirect's Location mapped
    onto relay's routes), Content-Length and Age left to each answer."""
    status = response.status_code
    if status == 200:
        return stored_headers(response.headers.raw)
    raw = downstream_response_headers(response.headers.raw, status)
    if status in REDIRECT_STATUSES:
        raw = rewrite_location_headers(raw, response.request.url, routes)
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name not in (b"content-length", b"age")
    ]


def rules(key: str, headers: httpx.Headers) -> httpx.Headers:
    """The headers the storage rules read: an index page's Vary names its key covers
    (Accept, Accept-Encoding) removed."""
    return _without_keyed_vary(headers) if INDEX_MARK in key else headers


def _without_keyed_vary(headers: httpx.Headers) -> httpx.Headers:
    names = [
        item.strip()
        for value in headers.get_list("vary")
        for item in value.split(",")
        if item.strip() and item.strip().lower() not in ("accept", "accept-encoding")
    ]
    out = httpx.Headers([(n, v) for n, v in headers.multi_items() if n.lower() != "vary"])
    if names:
        out["vary"] = ", ".join(names)
    return out


def _without_content_range(headers: httpx.Headers) -> httpx.Headers:
    """A 206's headers as the 200 of the whole object would carry them (for the storage
    rules)."""
    return httpx.Headers([(n, v) for n, v in headers.multi_items() if n.lower() != "content-range"])


def unrewritable(route: Route, status: int, headers: httpx.Headers) -> str | None:
    """Why an index page can be neither stored for serve-time rewriting nor answered (the
    relayed path refuses it with a 502): an encoded index, a partial one."""
    if not is_index_type(route, headers.get("content-type", "")):
        return None
    if status == 206:
        return "partial index page"
    encoding = headers.get("content-encoding", "identity").strip().lower()
    if status == 200 and encoding not in ("", "identity"):
        return "encoded index page"
    return None


def announced_sha256(headers: httpx.Headers) -> str | None:
    """The body's SHA-256 as the upstream announces it (None: none, or conflicting ones)."""
    try:
        return upstream_sha256(headers) or linked_sha256(headers)
    except DigestConflict:
        return None


def is_immutable(route: Route, declared: bool, headers: httpx.Headers) -> bool:
    """An object the operator declared immutable stays so unless it is an index page."""
    return declared and not is_index_type(route, headers.get("content-type", ""))


def answers_unstored(
    reason: str, status: int, rules: httpx.Headers, *, content_addressed: bool
) -> Answers:
    """Which of the fill's clients an answer that is not stored answers (`rules`: its
    headers as the storage rules read them)."""
    if reason in _ANSWERS_NONE or vary_of(rules) is None:
        return "none"
    if content_addressed and status != 200:
        # The Hub named this object to each client on its own request (its credentials
        # included): a refusal of the fill is not every client's answer.
        return "none"
    return "one" if for_one_client(rules) else "all"


def whole(
    route: Route,
    key: str,
    status: int,
    headers: httpx.Headers,
    *,
    max_object_bytes: int,
    content_addressed: bool,
    has_clients: bool,
    room: Callable[[int], bool],
) -> Whole:
    """What a fill of the whole object `key` does with the upstream's answer."""
    policy = rules(key, headers)
    reason = not_storable(status, policy)
    if reason is None and vary_of(policy) and VARIANT_MARK not in key:
        reason = VARY_LEARNED  # stored per encoding from the next request on
    if INDEX_MARK in key:
        reason = unrewritable(route, status, headers) or reason
    length = content_length(headers)
    if reason is None and length is not None and length > max_object_bytes:
        reason = TOO_LARGE
    if (
        reason is None
        and "content-length" not in headers
        and "transfer-encoding" not in headers
        and announced_sha256(headers) is None
    ):
        # A close-delimited body cut short looks complete: stored only when an announced
        # digest will tell (checked before it is published).
        reason = "body delimited by close"
    if reason is None and not room(length or 0):
        reason = "no room"
    if reason is None:
        return Whole("store", None, "all", length, policy)
    answers = answers_unstored(reason, status, policy, content_addressed=content_addressed)
    if answers == "none" or not has_clients:
        # Nobody to answer (a prefetch, clients gone): nothing to write.
        return Whole("close", reason, answers, length, policy)
    if status in BODYLESS_STATUSES:
        length = 0
    if reason in _TOO_BIG or (length is not None and not room(length)):
        if reason not in _TOO_BIG and length is not None:
            reason = TOO_LARGE if length > max_object_bytes else "no room"
        # Later requests are relayed (pass).
        return Whole("keep_open", reason, "none", length, policy)
    return Whole("answer", reason, answers, length, policy)


def whole_meta(
    verdict: Whole,
    response: httpx.Response,
    *,
    key: str,
    url: str,
    variant: str,
    received: float,
    immutable: bool,
    routes: RouteTable,
) -> Meta:
    """The record of a whole answer written to the partial file (stored, or not: `verdict`)."""
    headers = response.headers
    status = response.status_code
    return Meta(
        key=key,
        url=url,
        headers=stored_headers(headers.raw)
        if verdict.reason is None
        else answer_headers(response, routes),
        length=verdict.length or 0,
        stored_at=received,
        initial_age=initial_age(headers, received, received),
        lifetime=freshness_lifetime(headers, immutable=immutable),
        validator=resume_validator(headers) if status == 200 else None,
        vary=vary_of(verdict.rules) or "",
        status=status,
        extra={"variant": variant},
    )


def slice_(
    wanted: tuple[int, int, str | None],
    status: int,
    headers: httpx.Headers,
    *,
    max_object_bytes: int,
    sha256: str | None,
    room: Callable[[int], bool],
) -> Slice:
    """A slice is stored only from a 206 of exactly the bytes asked for (`wanted`: first
    byte, last byte, the validator it must carry or None), with a strong validator (the one
    asked for in If-Range, once one is known) and the total length. `sha256`: the whole
    object's digest when it is content-addressed."""
    first, last, validator = wanted
    reason: str | None = None
    passes_object = False
    parsed = parse_content_range(headers.get("content-range"))
    strong = resume_validator(headers)
    if status == 200:
        reason = "changed" if validator is not None else "no byte ranges"
    elif status != 206 or parsed is None or parsed.total is None:
        reason = f"status {status}"
    elif parsed.start != first or parsed.end != min(last, parsed.total - 1):
        reason = "unexpected Content-Range"
    elif parsed.total > max_object_bytes or (
        reason := not_storable(200, _without_content_range(headers))
    ):
        # The object itself may not be stored (too large, private, Set-Cookie, Vary: *):
        # its other ranges are relayed as the client asked (the key is passed).
        reason = reason or TOO_LARGE
        passes_object = True
    elif vary_of(headers) != "":
        reason = "vary"
    elif strong is None or (validator is not None and strong != validator):
        reason = "changed" if strong is not None else "no strong validator"
    content_sha256: str | None = None
    try:
        content_sha256 = upstream_sha256(
            httpx.Headers([("repr-digest", v) for v in headers.get_list("content-digest")])
        )
        whole_sha256 = sha256 or upstream_sha256(headers) or linked_sha256(headers)
    except DigestConflict:
        reason = reason or "conflicting digests"
        whole_sha256 = None
    length = parsed.end - parsed.start + 1 if parsed is not None else 0
    if reason is None and not room(length):
        reason = "no room"
    return Slice(
        reason,
        passes_object,
        parsed,
        strong,
        content_sha256,
        whole_sha256,
        length,
    )


def slice_meta(
    verdict: Slice,
    response: httpx.Response,
    *,
    key: str,
    url: str,
    first: int,
    received: float,
    immutable: bool,
) -> Meta:
    """The record of a slice to store (`verdict.reason` is None)."""
    parsed = verdict.content_range
    assert parsed is not None
    assert parsed.total is not None
    headers = response.headers
    meta = Meta(
        key=key,
        url=url,
        headers=stored_headers(headers.raw),
        length=verdict.length,
        stored_at=received,
        initial_age=initial_age(headers, received, received),
        lifetime=freshness_lifetime(headers, immutable=immutable),
        validator=verdict.validator,
        vary=vary_of(headers) or "",
        extra={"total": str(parsed.total), "first": str(first)},
    )
    if verdict.whole_sha256 is not None:
        # The whole object's digest: checked once every slice is stored (Cache).
        meta.extra["repr-sha256"] = verdict.whole_sha256
    return meta


def refreshed(
    old: Meta,
    headers: httpx.Headers,
    received: float,
    *,
    key: str,
    route: Route,
    declared_immutable: bool,
) -> Meta | str:
    """The stored response `old` (of the fill of `key`) updated by a 304 that freshens it
    (RFC 9111 4.3.4), or why
    the updated response may no longer be stored by a shared cache (`private`, `no-store`,
    `Set-Cookie`, a Vary relay does not key)."""
    updated = updated_headers(old.headers, stored_headers(headers.raw))
    refreshed_headers = httpx.Headers(updated)
    reason = not_storable(200, rules(key, refreshed_headers))
    if reason is not None:
        return reason
    lifetime_headers = httpx.Headers([*refreshed_headers.multi_items()])
    if "date" in headers:
        lifetime_headers["date"] = headers["date"]
    old_lm = old.extra.get("last-modified-for-heuristic")
    if old_lm and "last-modified" not in lifetime_headers:
        lifetime_headers["last-modified"] = old_lm
    return Meta(
        key=old.key,
        url=old.url,
        headers=updated,
        length=old.length,
        stored_at=received,
        initial_age=initial_age(headers, received, received),
        lifetime=freshness_lifetime(
            lifetime_headers,
            immutable=is_immutable(route, declared_immutable, refreshed_headers),
        ),
        validator=old.validator,
        sha256=old.sha256,
        vary=old.vary,
        complete=True,
        extra=old.extra,
    )
