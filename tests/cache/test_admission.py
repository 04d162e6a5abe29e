"""relay.cache.admission's fill request: built from the key alone, never from a client's headers
(an upstream that builds links from X-Forwarded-Host would otherwise store one client's host
for every client)."""

from __future__ import annotations

import dataclasses

import httpx
import pytest

from relay.cache.admission import fill_request, key_variant
from relay.config import Config, Route
from relay.errors import BadHeader
from relay.net.routing import RouteTable
from relay.net.upstream import USER_AGENT, Upstream
from relay.proxy.headers import shared_request_headers

PLAIN = Route(prefix="/o/", upstream="https://up.test/")
PYPI = Route(prefix="/pypi/", upstream="https://pypi.test/simple/", preset="pypi")
SECRET = dataclasses.replace(PLAIN, credential="Bearer route-secret")
FORWARDING = dataclasses.replace(PLAIN, forward_client_auth=True)


def _fill(route: Route, path: str, **kwargs: str) -> httpx.Request:
    config = Config(routes=(route,))
    upstream = Upstream(httpx.AsyncClient(), config)
    target = RouteTable(config.routes).resolve(path.encode(), b"")
    return fill_request(upstream, target, **kwargs)


def test_fill_request_holds_only_the_key_and_relays_identity() -> None:
    """The key's variant as Accept-Encoding, relay's User-Agent and Via: nothing else."""
    request = _fill(PLAIN, "/o/file.bin", variant="br,gzip")
    assert request.method == "GET"
    assert str(request.url) == "https://up.test/file.bin"
    assert request.headers.multi_items() == [
        ("host", "up.test"),
        ("accept-encoding", "br,gzip"),
        ("user-agent", USER_AGENT),
        ("via", "1.1 relay"),
    ]


def test_fill_request_of_an_index_page_asks_for_its_keyed_form_as_identity() -> None:
    accept = "application/vnd.pypi.simple.v1+json,text/html;q=0.1"
    request = _fill(PYPI, "/pypi/tinypkg/", variant=key_variant(PYPI, "gzip"), accept=accept)
    assert request.headers["accept"] == accept
    assert request.headers["accept-encoding"] == "identity"


def test_key_variant_is_identity_where_the_route_always_asks_for_it() -> None:
    assert key_variant(PYPI, "gzip, br") == "identity"
    assert key_variant(PLAIN, "gzip;q=0.5, br, zstd;q=0") == "br,gzip"
    assert key_variant(PLAIN, None) == "identity"


def test_fill_request_carries_the_routes_credential() -> None:
    request = _fill(SECRET, "/o/f", variant="identity")
    assert request.headers["authorization"] == "Bearer route-secret"


def test_shared_headers_take_only_credentials_from_the_client_where_the_route_forwards_them() -> (
    None
):
    client = [
        (b"host", b"attacker.example"),
        (b"x-forwarded-host", b"attacker.example"),
        (b"user-agent", b"evil/1"),
        (b"accept", b"text/html"),
        (b"cache-control", b"no-cache"),
        (b"authorization", b"Bearer mine"),
        (b"cookie", b"session=1"),
    ]
    names = {n for n, _ in shared_request_headers(PLAIN, accept_encoding="identity")}
    assert names == {"accept-encoding", "user-agent", "via"}
    kept = shared_request_headers(FORWARDING, accept_encoding="identity", client_headers=client)
    assert ("authorization", "Bearer mine") in kept
    assert ("cookie", "session=1") in kept
    assert {n for n, _ in kept} == {
        "accept-encoding",
        "user-agent",
        "via",
        "authorization",
        "cookie",
    }
    # Without forward_client_auth the client's credentials stay with the client.
    assert shared_request_headers(PLAIN, accept_encoding="identity", client_headers=client) == (
        shared_request_headers(PLAIN, accept_encoding="identity")
    )
    # The route's own credential replaces a client's header of the same name.
    both = dataclasses.replace(FORWARDING, credential="Bearer route-secret")
    sent = shared_request_headers(both, accept_encoding="identity", client_headers=client)
    assert [v for n, v in sent if n.lower() == "authorization"] == ["Bearer route-secret"]


def test_shared_headers_refuse_a_forwarded_credential_with_non_ascii_bytes() -> None:
    with pytest.raises(BadHeader):
        shared_request_headers(
            FORWARDING, accept_encoding="identity", client_headers=[(b"cookie", b"caf\xe9")]
        )
