"""relay.cache.policy and relay.cache.key: the RFC 9111 rules, sans-IO."""

from __future__ import annotations

import httpx
import pytest

from relay.cache.key import base_key, encoding_variant, variant_key
from relay.cache.policy import (
    HEURISTIC_CAP,
    IMMUTABLE_LIFETIME,
    answer,
    cache_status,
    freshens,
    freshness,
    freshness_lifetime,
    initial_age,
    not_storable,
    updated_headers,
    vary_of,
)

DATE = "Tue, 01 Dec 2026 00:00:00 GMT"


def _h(**values: str) -> httpx.Headers:
    return httpx.Headers({k.replace("_", "-"): v for k, v in values.items()})


def test_lifetime_prefers_s_maxage_then_max_age_then_expires() -> None:
    both = _h(cache_control="max-age=10, s-maxage=20", date=DATE)
    assert freshness_lifetime(both) == 20
    assert freshness_lifetime(_h(cache_control="max-age=10", expires=DATE, date=DATE)) == 10
    expires = _h(date=DATE, expires="Tue, 01 Dec 2026 00:01:00 GMT")
    assert freshness_lifetime(expires) == 60
    assert freshness_lifetime(_h(date=DATE, expires="0")) == 0


def test_lifetime_heuristic_is_a_tenth_of_the_last_modified_age_capped() -> None:
    recent = _h(date=DATE, last_modified="Mon, 30 Nov 2026 23:00:00 GMT")
    assert freshness_lifetime(recent) == 360
    old = _h(date=DATE, last_modified="Mon, 01 Jan 2024 00:00:00 GMT")
    assert freshness_lifetime(old) == HEURISTIC_CAP
    assert freshness_lifetime(_h()) == 0


def test_initial_age_counts_the_upstream_age() -> None:
    assert initial_age(_h(age="30"), 100.0, 101.0) == 31


@pytest.mark.parametrize(
    ("status", "headers", "reason"),
    [
        (200, {"cache-control": "no-store"}, "no-store"),
        (200, {"cache-control": "private, max-age=60"}, "private"),
        (200, {"vary": "User-Agent"}, "vary"),
        (200, {"set-cookie": "a=b"}, "set-cookie"),
        (404, {}, "status 404"),
        (200, {"cache-control": "public, max-age=60", "vary": "accept-encoding"}, None),
    ],
)
def test_not_storable(status: int, headers: dict[str, str], reason: str | None) -> None:
    assert not_storable(status, httpx.Headers(headers)) == reason


def test_vary_only_accept_encoding_is_kept() -> None:
    assert vary_of(_h()) == ""
    assert vary_of(_h(vary="Accept-Encoding")) == "accept-encoding"
    assert vary_of(_h(vary="Accept-Encoding, Origin")) is None
    assert vary_of(_h(vary="*")) is None


def test_no_cache_always_revalidates_and_must_revalidate_forbids_stale() -> None:
    assert not freshness(_h(cache_control="no-cache"), 0, 100).fresh
    assert freshness(_h(cache_control="max-age=100"), 5, 100).fresh
    stale = freshness(_h(cache_control="max-age=1, stale-while-revalidate=60"), 10, 1)
    assert stale.may_serve_stale_while_revalidating()
    assert not freshness(_h(cache_control="must-revalidate"), 10, 1).may_serve_stale_on_error(99)
    silent = freshness(_h(cache_control="max-age=1"), 10, 1)
    assert not silent.may_serve_stale_on_error(0)
    assert silent.may_serve_stale_on_error(60)
    assert freshness(_h(cache_control="stale-if-error=60"), 10, 1).may_serve_stale_on_error(0)


def test_answer_conditionals_and_ranges() -> None:
    stored = _h(etag='"a"', last_modified="Mon, 30 Nov 2026 23:00:00 GMT")
    assert answer(_h(if_none_match='"a"'), stored, 100).status == 304
    assert answer(_h(if_none_match='W/"a"'), stored, 100).status == 304
    assert answer(_h(if_none_match='"b"'), stored, 100).status == 200
    assert answer(_h(if_modified_since=DATE), stored, 100).status == 304
    part = answer(_h(range="bytes=10-19"), stored, 100)
    assert (part.status, part.start, part.stop) == (206, 10, 20)
    assert answer(_h(range="bytes=100-"), stored, 100).status == 416
    assert answer(_h(range="bytes=0-9", if_range='"b"'), stored, 100).status == 200
    assert answer(_h(range="bytes=0-9", if_range='"a"'), stored, 100).status == 206
    # If-None-Match is answered before the Range, even an unsatisfiable one (RFC 9110 13.2.2).
    assert answer(_h(range="bytes=100-", if_none_match='"a"'), stored, 100).status == 304


def test_answer_of_a_body_whose_length_is_not_known_yet() -> None:
    """An unsized fill: its conditionals apply; a Range is answered whole, to its end."""
    stored = _h(etag='"a"')
    assert answer(_h(if_none_match='"a"'), stored, None).status == 304
    whole = answer(_h(range="bytes=10-19"), stored, None)
    assert (whole.status, whole.start, whole.stop) == (200, 0, -1)


LM = "Mon, 30 Nov 2026 23:00:00 GMT"


@pytest.mark.parametrize(
    ("stored", "not_modified", "freshened"),
    [
        # A strong ETag: the stored strong ETag, compared strongly.
        ({"etag": '"e1"'}, {"etag": '"e1"'}, True),
        ({"etag": '"e1"'}, {"etag": '"e2"'}, False),
        ({"etag": 'W/"e1"'}, {"etag": '"e1"'}, False),
        ({}, {"etag": '"e1"'}, False),
        # A weak ETag: compared weakly.
        ({"etag": '"e1"'}, {"etag": 'W/"e1"'}, True),
        ({"etag": 'W/"e1"'}, {"etag": 'W/"e1"'}, True),
        ({"etag": '"e1"'}, {"etag": 'W/"e2"'}, False),
        # No ETag: the Last-Modified date (the stored ETag is not contradicted).
        ({"etag": '"e1"', "last-modified": LM}, {"last-modified": LM}, True),
        ({"last-modified": LM}, {"last-modified": "Tue, 01 Dec 2026 00:00:00 GMT"}, False),
        ({"etag": '"e1"'}, {"last-modified": LM}, False),
        ({"last-modified": LM}, {"last-modified": "not a date"}, False),
        # No validator: the answer to relay's own conditional request for this response.
        ({"etag": '"e1"'}, {}, True),
        ({}, {"cache-control": "max-age=60"}, True),
    ],
)
def test_a_304_freshens_only_the_response_whose_validator_it_names(
    stored: dict[str, str], not_modified: dict[str, str], freshened: bool
) -> None:
    """RFC 9111 4.3.4: a 304 naming another validator does not update the stored response."""
    assert freshens(httpx.Headers(stored), httpx.Headers(not_modified)) is freshened


def test_a_304s_fields_replace_the_stored_ones() -> None:
    """RFC 9111 3.2: each field the 304 carries replaces every stored field of its name (a
    field of several lines stays several); Content-Type, Content-Encoding and Via do not."""
    stored = [
        ("ETag", '"e1"'),
        ("Cache-Control", "max-age=60"),
        ("Link", "<a>; rel=x"),
        ("Link", "<b>; rel=y"),
        ("Content-Type", "text/plain"),
    ]
    updated = updated_headers(
        stored,
        [("cache-control", "private"), ("Content-Type", "text/html"), ("X-New", "1")],
    )
    assert updated == [
        ("ETag", '"e1"'),
        ("Link", "<a>; rel=x"),
        ("Link", "<b>; rel=y"),
        ("Content-Type", "text/plain"),
        ("cache-control", "private"),
        ("X-New", "1"),
    ]
    assert not_storable(200, httpx.Headers(updated)) == "private"


def test_cache_status_members() -> None:
    assert cache_status(hit=False, fwd="miss", stored=True) == "relay; fwd=miss; stored"
    assert (
        cache_status(hit=False, fwd="stale", fwd_status=304) == "relay; fwd=stale; fwd-status=304"
    )
    assert cache_status(hit=True, ttl=5.5) == "relay; hit; ttl=5"


def test_keys() -> None:
    base = base_key("/o/", b"/o/file", b"v=1")
    assert base != base_key("/o/", b"/o/file", b"v=2")
    assert encoding_variant(None) == "identity"
    assert encoding_variant("gzip;q=0, br") == "br"
    assert encoding_variant("GZIP, br") == encoding_variant("br,gzip")
    assert variant_key(base, "gzip") != base


def test_freshness_lifetime_of_an_immutable_file() -> None:
    """At least a year whatever the upstream says, unless it asks for revalidation each time;
    a longer lifetime of its own is kept."""
    assert freshness_lifetime(_h(cache_control="max-age=0"), immutable=True) == IMMUTABLE_LIFETIME
    assert freshness_lifetime(_h(), immutable=True) == IMMUTABLE_LIFETIME
    assert freshness_lifetime(_h(cache_control="max-age=99999999"), immutable=True) == 99999999
    assert freshness_lifetime(_h(cache_control="no-cache, max-age=60"), immutable=True) == 60
    assert freshness_lifetime(_h(cache_control="max-age=0")) == 0
