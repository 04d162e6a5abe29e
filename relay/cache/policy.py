"""RFC 9111 as a shared cache, sans-IO: what is stored, how long it is fresh, how a client's
own conditional and range requests are answered, and the `Cache-Status` (RFC 9211) value."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from relay.http.ranges import Unsatisfiable, parse_range
from relay.http.validators import (
    if_range_holds,
    is_strong_etag,
    none_match,
    not_modified_since,
    parse_http_date,
)

#: Heuristic freshness: this fraction of the Last-Modified age (RFC 9111 4.2.2), capped.
HEURISTIC_FRACTION = 0.1
HEURISTIC_CAP = 24 * 3600.0
#: The freshness of an immutable file (`immutable = true` routes, a preset's file names) when
#: its upstream says less: a year, as `Cache-Control: immutable` answers usually say.
IMMUTABLE_LIFETIME = 365 * 24 * 3600.0

_DIRECTIVE = re.compile(r'\s*([A-Za-z0-9_-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^,]*))?\s*(?:,|$)')


def directives(values: Iterable[str]) -> dict[str, str]:
    """Cache-Control directives, names lowercased; a bare directive maps to ""."""
    out: dict[str, str] = {}
    for value in values:
        for m in _DIRECTIVE.finditer(value):
            name = m.group(1).lower()
            arg = (m.group(2) or "").strip().strip('"')
            out.setdefault(name, arg)
    return out


#: The largest delta-seconds a cache counts (RFC 9111 1.2.2): a larger value means this.
DELTA_SECONDS_MAX = 2.0**31


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    value = value.strip()
    if not (value.isascii() and value.isdigit()):
        return None
    return min(float(value), DELTA_SECONDS_MAX)  # float() of 309+ digits is inf


def response_directives(headers: httpx.Headers) -> dict[str, str]:
    return directives(headers.get_list("cache-control"))


def not_storable(status: int, headers: httpx.Headers) -> str | None:
    """Why a response to a GET may not be stored by a shared cache, or None."""
    if status != 200:
        return f"status {status}"
    cc = response_directives(headers)
    for name in ("no-store", "private"):
        if name in cc:
            return name
    if vary_of(headers) is None:
        return "vary"
    if "set-cookie" in headers:
        return "set-cookie"
    if "content-range" in headers:
        return "content-range on a 200"
    return None


def for_one_client(headers: httpx.Headers) -> bool:
    """Whether a response is meant for one client: `private` (RFC 9111 5.2.2.7) or one setting
    a cookie. A shared cache neither stores it nor hands it to another client waiting on the
    same upstream request (Varnish's hit-for-pass)."""
    return "private" in response_directives(headers) or "set-cookie" in headers


def vary_of(headers: httpx.Headers) -> str | None:
    """ "" when the response does not vary, "accept-encoding" when it varies on that only,
    None when it varies on anything else (not cached)."""
    names = {
        item.strip().lower()
        for value in headers.get_list("vary")
        for item in value.split(",")
        if item.strip()
    }
    if not names:
        return ""
    if names == {"accept-encoding"}:
        return "accept-encoding"
    return None


def freshness_lifetime(headers: httpx.Headers, *, immutable: bool = False) -> float:
    """s-maxage > max-age > Expires - Date > heuristic (10% of the Last-Modified age, 1 day
    at most) > 0. `immutable` (the operator declared the file immutable): at least
    IMMUTABLE_LIFETIME, unless the upstream asks for revalidation every time (`no-cache`)."""
    lifetime = _upstream_lifetime(headers)
    if immutable and "no-cache" not in response_directives(headers):
        return max(lifetime, IMMUTABLE_LIFETIME)
    return lifetime


def _upstream_lifetime(headers: httpx.Headers) -> float:
    cc = response_directives(headers)
    for name in ("s-maxage", "max-age"):
        if name in cc:
            seconds = _seconds(cc[name])
            return seconds if seconds is not None else 0.0
    date = parse_http_date(headers.get("date"))
    if "expires" in headers:
        expires = parse_http_date(headers.get("expires"))
        if expires is None or date is None:
            return 0.0
        return max(0.0, expires - date)
    modified = parse_http_date(headers.get("last-modified"))
    if modified is not None and date is not None and date > modified:
        return min(HEURISTIC_CAP, (date - modified) * HEURISTIC_FRACTION)
    return 0.0


def initial_age(headers: httpx.Headers, request_time: float, response_time: float) -> float:
    """The age of a response when it was received (RFC 9111 4.2.3)."""
    age_value = _seconds(headers.get("age")) or 0.0
    date = parse_http_date(headers.get("date"))
    apparent = max(0.0, response_time - date) if date is not None else 0.0
    corrected = age_value + (response_time - request_time)
    return max(apparent, corrected)


def current_age(initial_age: float, stored_at: float, now: float) -> float:
    """The age of a stored response at `now` (RFC 9111 4.2.3: its age when received plus the
    time it has been stored)."""
    return initial_age + max(0.0, now - stored_at)


def conditional_headers(stored: list[tuple[str, str]]) -> dict[str, str]:
    """The validators of a stored response, as the headers of a request revalidating it."""
    headers = httpx.Headers(stored)
    out: dict[str, str] = {}
    if "etag" in headers:
        out["if-none-match"] = headers["etag"]
    if "last-modified" in headers:
        out["if-modified-since"] = headers["last-modified"]
    return out


# ---- a 304 for a stored response (RFC 9111 4.3.4) ------------------------------------------


def freshens(stored: httpx.Headers, not_modified: httpx.Headers) -> bool:
    """Whether a 304 answering relay's conditional request identifies the stored response
    for update (RFC 9111 4.3.4): a strong ETag must be the stored response's strong ETag; a
    weak one must match it weakly; without an ETag, a Last-Modified must be the stored one's.
    Anything else names another representation: the stored response is not updated, and may
    not be used (its bytes are not the validator's). A 304 with no validator at all answers
    the one request relay made from this stored response's own validators (one stored
    response per key, so there is no other it could be about): it is updated. (RFC 9111
    identifies such a response only when the stored one has no validator either, because a
    cache may hold several; relay does not.)"""
    etag: str = not_modified.get("etag", "").strip()
    stored_etag: str = stored.get("etag", "").strip()
    if etag:
        if is_strong_etag(etag):
            return etag == stored_etag
        return bool(stored_etag) and etag.removeprefix("W/") == stored_etag.removeprefix("W/")
    last_modified = not_modified.get("last-modified")
    if last_modified is not None:
        modified = parse_http_date(last_modified)
        return modified is not None and modified == parse_http_date(stored.get("last-modified"))
    return True


# A 304's header fields that do not replace the stored ones: it describes no body, and Via is
# relay's own (RFC 9111 3.2; Content-Length and the like are not stored at all).
_NOT_UPDATED = frozenset({"content-type", "content-encoding", "via"})


def updated_headers(
    stored: list[tuple[str, str]], not_modified: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """The stored response's headers updated with a 304's (RFC 9111 3.2): the fields the 304
    carries replace every stored field of their name (a field sent as several lines stays
    several lines)."""
    fresh = [(name, value) for name, value in not_modified if name.lower() not in _NOT_UPDATED]
    replaced = {name.lower() for name, _ in fresh}
    return [(n, v) for n, v in stored if n.lower() not in replaced] + fresh


@dataclass(frozen=True, slots=True)
class Freshness:
    lifetime: float
    age: float
    must_revalidate: bool
    """no-cache (always revalidate) on the response."""
    no_stale: bool
    """must-revalidate / proxy-revalidate / s-maxage: never served stale, not even on errors."""
    while_revalidate: float
    if_error: float | None
    """stale-if-error seconds from the upstream, or None when it said nothing."""

    @property
    def fresh(self) -> bool:
        return not self.must_revalidate and self.age < self.lifetime

    @property
    def staleness(self) -> float:
        return max(0.0, self.age - self.lifetime)

    def may_serve_stale_while_revalidating(self) -> bool:
        return (
            not self.must_revalidate
            and not self.no_stale
            and self.staleness <= self.while_revalidate
            and self.while_revalidate > 0
        )

    def may_serve_stale_on_error(self, route_default: float) -> bool:
        if self.no_stale:
            return False
        allowed = self.if_error if self.if_error is not None else route_default
        return self.staleness <= allowed and allowed > 0


def freshness(headers: httpx.Headers, age: float, lifetime: float) -> Freshness:
    """How fresh a stored response is; `lifetime` was computed when it was received (the
    stored headers no longer carry the upstream's Date)."""
    cc = response_directives(headers)
    return Freshness(
        lifetime=lifetime,
        age=age,
        must_revalidate="no-cache" in cc,
        # s-maxage carries proxy-revalidate for a shared cache (RFC 9111 5.2.2.10).
        no_stale="must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc,
        while_revalidate=_seconds(cc.get("stale-while-revalidate")) or 0.0,
        if_error=_seconds(cc.get("stale-if-error")),
    )


# ---- the client's own request -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    """200, 206, 304 or 416."""
    start: int = 0
    stop: int = 0
    """The body's bytes [start, stop) of the object (206/200)."""


def answer(request: httpx.Headers, headers: httpx.Headers, length: int | None) -> Answer:
    """How a stored complete 200 of `length` bytes answers a client's GET or HEAD (the same
    rules for a whole object, its slices and a fill). `length` None: a body whose length is
    not known yet (an unsized fill): its conditionals apply, a Range is answered whole
    (`stop` -1: to its end)."""
    etag = headers.get("etag", "").strip()
    last_modified = headers.get("last-modified", "").strip()
    inm = request.get("if-none-match")
    if inm is not None:
        if etag and none_match(inm, etag):
            return Answer(304)
    else:
        ims = request.get("if-modified-since")
        modified = parse_http_date(last_modified)
        if ims is not None and modified is not None and not_modified_since(ims, modified):
            return Answer(304)
    if length is None:
        return Answer(200, 0, -1)
    whole = Answer(200, 0, length)
    range_value = request.get("range")
    if range_value is None:
        return whole
    if_range = request.get("if-range")
    if if_range is not None and not if_range_holds(if_range, etag, last_modified):
        return whole
    try:
        window = parse_range(range_value, length)
    except Unsatisfiable:
        return Answer(416)
    if window is None:
        return whole
    return Answer(206, window[0], window[1])


# ---- Cache-Status (RFC 9211) ----------------------------------------------------------------


def cache_status(
    *,
    hit: bool,
    fwd: str | None = None,
    fwd_status: int | None = None,
    stored: bool = False,
    ttl: float | None = None,
    detail: str | None = None,
) -> str:
    parts = ["relay"]
    if hit:
        parts.append("hit")
    if fwd is not None:
        parts.append(f"fwd={fwd}")
    if fwd_status is not None:
        parts.append(f"fwd-status={fwd_status}")
    if stored:
        parts.append("stored")
    if ttl is not None:
        parts.append(f"ttl={int(ttl)}")
    if detail:
        parts.append(f'detail="{detail}"')
    return "; ".join(parts)
