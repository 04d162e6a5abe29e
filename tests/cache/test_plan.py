"""relay.cache.plan: what the cache does with one request, from plain values (no I/O, no sleep)."""

from __future__ import annotations

import pytest

from relay.cache import plan
from relay.cache.plan import MISS_STORED, Step
from relay.cache.store import Meta

NOW = 1_800_000_000.0


def _meta(cache_control: str, *, age: float, lifetime: float = 60.0) -> Meta:
    """A stored response received `age` seconds before NOW."""
    return Meta(
        key="k",
        url="http://up.test/a",
        headers=[("ETag", '"v1"'), ("Cache-Control", cache_control)],
        length=3,
        stored_at=NOW - age,
        initial_age=0.0,
        lifetime=lifetime,
        validator='"v1"',
        complete=True,
    )


def test_fresh_is_a_hit_with_its_ttl() -> None:
    decided = plan.for_stored(_meta("max-age=60", age=20.5), NOW, content_addressed=False)
    assert decided.step is Step.HIT
    assert decided.cache_status == "relay; hit; ttl=39"


def test_age_counts_the_age_when_received() -> None:
    meta = _meta("max-age=60", age=10)
    meta.initial_age = 55
    assert plan.age_of(meta, NOW) == 65
    assert plan.for_stored(meta, NOW, content_addressed=False).step is Step.REVALIDATE
    assert plan.age_of(meta, NOW - 100) == 55  # a clock behind stored_at adds nothing


def test_content_addressed_is_always_a_hit_without_ttl() -> None:
    decided = plan.for_stored(_meta("no-cache", age=10_000), NOW, content_addressed=True)
    assert decided.step is Step.HIT
    assert decided.cache_status == "relay; hit"


def test_stale_within_stale_while_revalidate() -> None:
    meta = _meta("max-age=60, stale-while-revalidate=30", age=80)
    decided = plan.for_stored(meta, NOW, content_addressed=False)
    assert decided.step is Step.STALE_WHILE_REVALIDATE
    assert decided.cache_status == 'relay; hit; fwd=stale; detail="stale-while-revalidate"'
    beyond = _meta("max-age=60, stale-while-revalidate=30", age=91)
    assert plan.for_stored(beyond, NOW, content_addressed=False).step is Step.REVALIDATE


@pytest.mark.parametrize("cache_control", ["no-cache", "max-age=60, must-revalidate"])
def test_no_cache_and_must_revalidate_are_revalidated(cache_control: str) -> None:
    age = 10 if cache_control == "no-cache" else 90
    decided = plan.for_stored(_meta(cache_control, age=age), NOW, content_addressed=False)
    assert decided.step is Step.REVALIDATE
    assert decided.stored is not None


def test_after_revalidation_a_304_refreshes() -> None:
    stored = plan.freshness_of(_meta("max-age=60", age=90), NOW)
    then = plan.after_revalidation(stored, refreshed=True, failure=None, route_stale_if_error=0)
    assert then.step is Step.REVALIDATED
    assert then.cache_status == "relay; fwd=stale; fwd-status=304"


def test_after_revalidation_an_error_serves_stale_where_allowed() -> None:
    allowed = plan.freshness_of(_meta("max-age=60, stale-if-error=100", age=90), NOW)
    then = plan.after_revalidation(allowed, refreshed=False, failure=503, route_stale_if_error=0)
    assert then.step is Step.STALE_IF_ERROR
    assert then.cache_status == 'relay; hit; fwd=stale; fwd-status=503; detail="stale-if-error"'
    # The route's default applies when the upstream said nothing.
    silent = plan.freshness_of(_meta("max-age=60", age=90), NOW)
    assert (
        plan.after_revalidation(silent, refreshed=False, failure=502, route_stale_if_error=60).step
        is Step.STALE_IF_ERROR
    )
    assert (
        plan.after_revalidation(silent, refreshed=False, failure=502, route_stale_if_error=0).step
        is Step.FORWARD
    )
    # must-revalidate: never stale, not even on errors.
    strict = plan.freshness_of(_meta("max-age=60, must-revalidate", age=90), NOW)
    assert (
        plan.after_revalidation(strict, refreshed=False, failure=502, route_stale_if_error=600).step
        is Step.FORWARD
    )


def test_after_revalidation_a_new_body_is_forwarded() -> None:
    stored = plan.freshness_of(_meta("max-age=60, stale-if-error=100", age=90), NOW)
    then = plan.after_revalidation(stored, refreshed=False, failure=None, route_stale_if_error=60)
    assert then.step is Step.FORWARD
    assert then.cache_status == "relay; fwd=stale"


@pytest.mark.parametrize(
    ("method", "ranged", "filling", "passing", "sliced", "step"),
    [
        ("GET", False, False, False, False, Step.MISS),
        ("GET", True, False, False, False, Step.SLICES),
        # A passed key's ranges are relayed too (no slice fetched for them).
        ("GET", True, False, True, True, Step.PASS),
        ("GET", False, False, True, True, Step.PASS),
        ("GET", False, False, False, True, Step.FROM_SLICES),
        ("HEAD", False, False, False, True, Step.FROM_SLICES),
        ("HEAD", True, False, False, False, Step.PASS),
        ("HEAD", False, False, False, False, Step.PASS),
        # A fill in flight is joined, whatever the request.
        ("GET", True, True, True, True, Step.MISS),
        ("HEAD", False, True, False, False, Step.MISS),
    ],
)
def test_for_absent(
    method: str, ranged: bool, filling: bool, passing: bool, sliced: bool, step: Step
) -> None:
    decided = plan.for_absent(
        method=method, ranged=ranged, filling=filling, passing=passing, sliced=sliced
    )
    assert decided.step is step
    if step is Step.MISS:
        assert decided.cache_status == "relay; fwd=miss"


def test_fresh_hit_of_the_hit_path() -> None:
    assert plan.fresh_hit(must_revalidate=False, age=10.2, lifetime=60) == "relay; hit; ttl=49"
    assert plan.fresh_hit(must_revalidate=False, age=60, lifetime=60) is None
    assert plan.fresh_hit(must_revalidate=True, age=0, lifetime=60) is None


def test_slices_status() -> None:
    meta = _meta("max-age=60", age=15)
    assert (
        plan.slices_status(meta, NOW, revalidated=False, stale_status=None, content_addressed=False)
        == "relay; hit; ttl=45"
    )
    assert (
        plan.slices_status(meta, NOW, revalidated=False, stale_status=None, content_addressed=True)
        == "relay; hit"
    )
    assert plan.slices_status(
        meta, NOW, revalidated=True, stale_status=None, content_addressed=False
    ).endswith("fwd-status=304")
    assert "stale-if-error" in plan.slices_status(
        meta, NOW, revalidated=False, stale_status=504, content_addressed=False
    )
    assert MISS_STORED == "relay; fwd=miss; stored"
