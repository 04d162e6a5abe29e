"""Upstream.url_for builds the same httpx.URL that parsing the target URL would, without
parsing it; and requests carry the Host header httpx would have added."""

from __future__ import annotations

import httpx
import pytest

from relay.config import Config, Route
from relay.net.routing import RouteTable
from relay.net.upstream import Upstream

ROUTES = (
    Route(prefix="/gh/", upstream="https://github.com/"),
    Route(prefix="/v2/", upstream="https://special.example:8443/v2"),
    Route(prefix="/ip/", upstream="http://127.0.0.1:8080/base/", allow_private=True),
    Route(prefix="/v6/", upstream="http://[::1]:9000/", allow_private=True),
    Route(prefix="/", upstream="HTTPS://Up.Example:443/root/"),
)
TABLE = RouteTable(ROUTES)

PATHS = [
    b"/gh/org/repo/releases/download/v1/big.tar.gz",
    b"/gh/",
    b"/gh/a/b/",
    b"/gh/%7Euser/file%20name.bin",
    b"/gh/%c3%a9t%C3%A9",
    b"/gh/a;b=c/d:e@f/g!h$i&j'k(l)m*n+o,p",
    b"/v2/x",
    b"/ip/deep/path/",
    b"/v6/x",
    b"/anything/else",
]
QUERIES = [
    b"",
    b"sig=a%2Fb&e=1",
    b"a=1&b=2&c",
    b"x=[1]&y=@:/?",
    b'a="quoted"',  # httpx escapes these: parsed the usual way
    b"a=<tag>&b={x}|^`\\",
    b"bad=%zz",
    b"%",
]


@pytest.mark.parametrize("raw", PATHS)
@pytest.mark.parametrize("query", QUERIES)
def test_url_for_equals_parsing_the_target_url(raw: bytes, query: bytes) -> None:
    target = TABLE.resolve(raw, query)
    upstream = Upstream(httpx.AsyncClient(), Config(routes=ROUTES))
    built = upstream.url_for(target)
    parsed = httpx.URL(target.url)
    assert built == parsed
    assert str(built) == str(parsed)
    assert built.raw_path == parsed.raw_path
    assert (built.scheme, built.host, built.port, built.netloc) == (
        parsed.scheme,
        parsed.host,
        parsed.port,
        parsed.netloc,
    )


def test_requests_get_the_host_header_httpx_would_add() -> None:
    upstream = Upstream(httpx.AsyncClient(), Config(routes=ROUTES))
    route = ROUTES[1]
    target = TABLE.resolve(b"/v2/file", b"")
    request = upstream.build_request("GET", upstream.url_for(target), [("x-a", "1")], route)
    reference = httpx.Request("GET", target.url, headers=[("x-a", "1")])
    assert request.headers.raw == reference.headers.raw
    assert request.headers["host"] == "special.example:8443"
    assert request.read() == b""
    # A Host given by the caller (a redirect keeps none; downloads never set one) is kept.
    given = upstream.build_request("GET", target.url, [("host", "h.example")], route)
    assert given.headers.get_list("host") == ["h.example"]
