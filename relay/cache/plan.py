"""What the cache does with one request, sans-IO: hit, stale-while-revalidate, revalidate,
stale-if-error, miss, slices or pass, as pure functions of plain values (the stored
response's Meta or nothing, the clock's `now`, the request's method and headers, the route's
settings, what is in flight). The serving code (`relay.cache.serve`, `relay.cache.slices`)
acts on the `Plan`; the RFC 9111 rules themselves are `relay.cache.policy`'s.

A stored response is planned in up to two steps: `for_stored` (HIT, STALE_WHILE_REVALIDATE or
REVALIDATE), then, once a revalidation's headers are in, `after_revalidation` (REVALIDATED,
STALE_IF_ERROR, FORWARD or PASS). Without a stored response, `for_absent` (MISS, SLICES,
FROM_SLICES or PASS); an answer from stored slices, `from_slices`.

Every plan that answers carries both ways the answer is reported, decided together: its
`Cache-Status` (RFC 9211) and its `outcome`, the access log's `cache` field and the
`CacheStats` counter it adds to.
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
    """The upstream said 304 for the stored response: answer from it, refreshed."""
    STALE_IF_ERROR = "stale-if-error"
    """The upstream failed and allows a stale answer: answer from the stored response."""
    FORWARD = "forward"
    """The revalidation brought another response (or its 304 named another version, and
    the fill fetched it): answer from its fill."""
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
    outcome: str = ""
    """Where the step answers from the cache, what the answer is (reported with
    cache_status): "hit" (a fresh stored response), "miss" (a fill: no usable stored
    response), "stale" (stale-while-revalidate, stale-if-error), "revalidated" (a stale one
    the upstream confirmed with a 304) or "expired" (the new response a stale one's
    revalidation brought). The access log's `cache` field, and the `CacheStats` counter."""


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
        return Plan(Step.HIT, cache_status(hit=True, ttl=ttl), outcome="hit")
    if stored.may_serve_stale_while_revalidating():
        status = cache_status(hit=True, fwd="stale", detail="stale-while-revalidate")
        return Plan(Step.STALE_WHILE_REVALIDATE, status, outcome="stale")
    return Plan(Step.REVALIDATE, stored=stored)


def stale_on_error(stored: Freshness, failure: int | None, route_stale_if_error: float) -> bool:
    """Whether the upstream's `failure` (its status: unreachable, 5xx; None: no failure) lets
    the stale stored response answer (RFC 5861 stale-if-error, else the route's default)."""
    return failure is not None and stored.may_serve_stale_on_error(route_stale_if_error)


_REVALIDATED = Plan(
    Step.REVALIDATED, cache_status(hit=False, fwd="stale", fwd_status=304), outcome="revalidated"
)
_EXPIRED = Plan(Step.FORWARD, cache_status(hit=False, fwd="stale"), outcome="expired")


def fill_status(planned: str, *, stored: bool, fwd_status: int) -> str:
    """Cache-Status of an answer from a fill (`planned`: the plan's, e.g. `fwd=miss`): it
    says `stored` (only once the fill published the object: `MISS`), or the status the
    upstream answered when the answer is known not to be stored."""
    return planned + ("; stored" if stored else f"; fwd-status={fwd_status}")


_PASS = Plan(Step.PASS)


def after_revalidation(
    stored: Freshness,
    *,
    refreshed: bool,
    failure: int | None,
    route_stale_if_error: float,
    superseded: bool = False,
    withdrawn: bool = False,
) -> Plan:
    """The revalidation's headers are in: `refreshed` (a 304 for the stored response), or
    the upstream's `failure`. `superseded`: its 304 named another version, so the stored
    response may not be used, not even stale (the fill fetches the current one instead);
    `withdrawn`: its 304 made the stored response unfit to share (`private`, `no-store`...):
    every waiting client is relayed (`relay.cache.fill`)."""
    if refreshed:
        return _REVALIDATED
    if withdrawn:
        return _PASS
    if not superseded and stale_on_error(stored, failure, route_stale_if_error):
        status = cache_status(hit=True, fwd="stale", fwd_status=failure, detail="stale-if-error")
        return Plan(Step.STALE_IF_ERROR, status, outcome="stale")
    return _EXPIRED


#: An answer from a fill: no stored response could answer. Its head says `stored` only when
#: it is sent after the fill published the object (`relay.cache.delivery`): before, nobody
#: knows whether it will be.
MISS = Plan(Step.MISS, cache_status(hit=False, fwd="miss"), outcome="miss")


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
    return MISS


def from_slices(
    meta: Meta,
    now: float,
    *,
    revalidated: bool,
    stale_status: int | None,
    content_addressed: bool,
) -> Plan:
    """An answer from stored slices (`meta`: the first one's), reported as the same answer
    from a whole object is: refreshed by a 304, stale on an error, or a hit."""
    if revalidated:
        return _REVALIDATED
    if stale_status is not None:
        status = cache_status(
            hit=True, fwd="stale", fwd_status=stale_status, detail="stale-if-error"
        )
        return Plan(Step.STALE_IF_ERROR, status, outcome="stale")
    # A content-addressed object's slices never go stale: no ttl to tell.
    ttl = ttl_of(meta, now) if not content_addressed else None
    return Plan(Step.HIT, cache_status(hit=True, ttl=ttl), outcome="hit")
