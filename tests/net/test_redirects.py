"""A passed-on redirect's Location is mapped onto relay's path for the route below whose
upstream it points; nothing else in the head changes."""

from __future__ import annotations

import httpx

from relay.config import Route
from relay.net.redirects import rewrite_location_headers
from relay.net.routing import RouteTable

TABLE = RouteTable(
    (
        Route(prefix="/o/", upstream="https://files.test/pub/"),
        Route(prefix="/mirror/", upstream="https://mirror.test/"),
    )
)
BASE = httpx.URL("https://files.test/pub/a/old")


def test_redirects_location_below_a_route_is_mapped_to_relay_paths() -> None:
    headers = [(b"location", b"new?x=1"), (b"content-length", b"0")]
    assert rewrite_location_headers(headers, BASE, TABLE) == [
        (b"location", b"/o/a/new?x=1"),
        (b"content-length", b"0"),
    ]
    other = [(b"location", b"https://mirror.test/p/f")]
    assert rewrite_location_headers(other, BASE, TABLE) == [(b"location", b"/mirror/p/f")]


def test_redirects_location_elsewhere_or_unparsable_is_passed_on_unchanged() -> None:
    for value in (b"https://elsewhere.test/x", b"http://[bad", b"https://files.test/private"):
        headers = [(b"location", value), (b"x-other", b"new")]
        assert rewrite_location_headers(headers, BASE, TABLE) == headers


def test_redirects_location_bytes_outside_ascii_survive_as_latin_1() -> None:
    headers = [(b"location", b"https://elsewhere.test/caf\xe9")]
    assert rewrite_location_headers(headers, BASE, TABLE) == headers


def test_a_location_below_any_mirror_of_a_route_maps_to_its_prefix() -> None:
    """A passed redirect from the second mirror to a path below it keeps the client on relay."""
    table = RouteTable((Route.parse("/m/=https://a.example/,https://b.example/mirror/"),))
    headers = [(b"location", b"https://b.example/mirror/pkg/file.tgz")]
    base = httpx.URL("https://b.example/mirror/pkg/")
    assert rewrite_location_headers(headers, base, table) == [(b"location", b"/m/pkg/file.tgz")]
