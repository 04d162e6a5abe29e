"""What the cache does with one request, sans-IO: hit, stale-while-revalidate, revalidate,
stale-if-error, miss, slices or pass, as pure functions of plain values (the stored
response's Meta or nothing, the clock's `now`, the request's method and headers, the route's
settings, what is in flight). The serving code (`relay.cache.serve`, `relay.cache.slices`)
acts on the `Plan`; the RFC 9111 rules themselves are `relay.cache.policy`'s.

A stored response is planned in up to two steps: `for_stored` (HIT, STALE_WHILE_REVALIDATE or
REVALIDATE), then, once a revalidation's headers are in, `after_revalidation` (REVALIDATED,
STALE_IF_ERROR or FORWARD). Without a stored response, `for_absent` (MISS, SLICES,
FROM_SLICES or PASS).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from relay.cache.policy import Freshness, cache_status, current_age, freshness
from relay.cache.store import Meta
from relay.config import Route


@dataclass(frozen=True, slots=True)
class Asked:
    """One request as the cache answers it."""

    method: str
    base: str
    """The object's base key (`relay.cache.key`)."""
    variant: str
    """The request's encoding variant."""
    route: Route
    fill_request: Callable[[], httpx.Request]
    """Builds the upstream GET of a fill of this object."""
    client_headers: httpx.Headers
    sha256: str | None
    """The object is content-addressed: its key names this digest."""


class Step(enum.Enum):
    HIT = "hit"
    """Answer from the stored response."""
    STALE_WHILE_REVALIDATE = "stale-while-revalidate"
    """Start (or join) its revalidation; answer from the stored response meanwhile."""
    REVALIDATE = "revalidate"
    """Start (or join) its revalidation, wait for its headers, then `after_revalidation`."""
    REVALIDATED = "revalidated"
    """The upstream said 304: answer from the refreshed stored response."""
    STALE_IF_ERROR = "stale-if-error"
    """The upstream failed and allows a stale answer: answer from the stored response."""
    FORWARD = "forward"
    """The revalidation brought another response: answer from its fill."""
    MISS = "miss"
    """Start (or join) the fill of the object; answer from it."""
    SLICES = "slices"
    """A Range of an object not stored whole: answer from its aligned slices."""
    FROM_SLICES = "from-slices"
    """A whole GET or HEAD of an object with slices: answer from them if they can; else plan
    again with `sliced=False`."""
    PASS = "pass"  # noqa: S105 (a step, not a password)
    """Relayed, not through the cache."""


@dataclass(frozen=True, slots=True)
class Plan:
    step: Step
    cache_status: str = ""
    """The answer's Cache-Status (RFC 9211), where the step answers from the cache."""
    stored: Freshness | None = None
    """REVALIDATE: the stored response's freshness, for `after_revalidation`."""


def age_of(meta: Meta, now: float) -> float:
    """The stored response's current age."""
    return current_age(meta.initial_age, meta.stored_at, now)


def ttl_of(meta: Meta, now: float) -> float:
    """How long the stored response stays fresh (negative: stale since)."""
    return meta.lifetime - age_of(meta, now)


def freshness_of(meta: Meta, now: float) -> Freshness:
    return freshness(httpx.Headers(meta.headers), age_of(meta, now), meta.lifetime)


def fresh_hit(*, must_revalidate: bool, age: float, lifetime: float) -> str | None:
    """The Cache-Status of a fresh hit on a stored response (the hit path's precomputed
    `no-cache`, its age and lifetime), None when it is not fresh."""
    if must_revalidate or age >= lifetime:
        return None
    return cache_status(hit=True, ttl=lifetime - age)


def for_stored(meta: Meta, now: float, *, content_addressed: bool) -> Plan:
    """A stored response. `content_addressed`: its key names its digest, so it is always
    fresh (and its answers carry no ttl)."""
    age = age_of(meta, now)
    stored = freshness(httpx.Headers(meta.headers), age, meta.lifetime)
    if stored.fresh or content_addressed:
        ttl = meta.lifetime - age if not content_addressed else None
        return Plan(Step.HIT, cache_status(hit=True, ttl=ttl))
    if stored.may_serve_stale_while_revalidating():
        status = cache_status(hit=True, fwd="stale", detail="stale-while-revalidate")
        return Plan(Step.STALE_WHILE_REVALIDATE, status)
    return Plan(Step.REVALIDATE, stored=stored)


def stale_on_error(stored: Freshness, failure: int | None, route_stale_if_error: float) -> bool:
    """Whether the upstream's `failure` (its status: unreachable, 5xx; None: no failure) lets
    the stale stored response answer (RFC 5861 stale-if-error, else the route's default)."""
    return failure is not None and stored.may_serve_stale_on_error(route_stale_if_error)


def after_revalidation(
    stored: Freshness, *, refreshed: bool, failure: int | None, route_stale_if_error: float
) -> Plan:
    """The revalidation's headers are in: `refreshed` (a 304), or the upstream's `failure`."""
    if refreshed:
        return Plan(Step.REVALIDATED, cache_status(hit=False, fwd="stale", fwd_status=304))
    if stale_on_error(stored, failure, route_stale_if_error):
        status = cache_status(hit=True, fwd="stale", fwd_status=failure, detail="stale-if-error")
        return Plan(Step.STALE_IF_ERROR, status)
    return Plan(Step.FORWARD, cache_status(hit=False, fwd="stale"))


#: Cache-Status of an answer from a fill that stores what it sends.
MISS_STORED = cache_status(hit=False, fwd="miss", stored=True)


def fill_status(planned: str, *, stored: bool, fwd_status: int) -> str:
    """Cache-Status of an answer from a fill (`planned`: the plan's, e.g. `fwd=miss`): it
    says `stored`, or the status the upstream answered when the answer is not stored."""
    return planned + ("; stored" if stored else f"; fwd-status={fwd_status}")


_MISS = Plan(Step.MISS, cache_status(hit=False, fwd="miss"))
_PASS = Plan(Step.PASS)


def for_absent(*, method: str, ranged: bool, filling: bool, passing: bool, sliced: bool) -> Plan:
    """No stored response. `filling`: a fill of the object is in flight (joined whatever the
    request); `passing`: a recent answer for the key could be neither stored nor shared
    (`relay.cache.cache.PASS_SECONDS`), so each client is relayed; `sliced`: the object has
    slices (stored or being filled)."""
    if not filling:
        if passing:
            return _PASS  # ranges too: a range of an object that may not be stored is relayed
        if method == "GET" and ranged:
            return Plan(Step.SLICES)
        if sliced:
            return Plan(Step.FROM_SLICES)
        if method != "GET":
            return _PASS
    return _MISS


def slices_status(
    meta: Meta,
    now: float,
    *,
    revalidated: bool,
    stale_status: int | None,
    content_addressed: bool,
) -> str:
    """Cache-Status of an answer from stored slices (`meta`: the first one's)."""
    if revalidated:
        return cache_status(hit=False, fwd="stale", fwd_status=304)
    if stale_status is not None:
        return cache_status(hit=True, fwd="stale", fwd_status=stale_status, detail="stale-if-error")
    # A content-addressed object's slices never go stale: no ttl to tell.
    return cache_status(hit=True, ttl=ttl_of(meta, now) if not content_addressed else None)
