"""Upstream redirects: passed to the client (default), or followed by relay on an allow-list.

Passed through, a Location that points below a route's upstream base is rewritten to that
route's path on relay, so the client keeps coming through relay. Followed (release assets that
redirect to signed storage URLs), a redirect goes only to hosts on the route's allow-list, over
http(s), through the same egress checks, for at most max_redirects hops. Credentials (the route's
own, and the client's Authorization and Cookie where the route forwards them) go only to the
same origin: scheme, host and port. A Location that does not parse is a 502 when followed and
passed on unchanged when not.
"""

from __future__ import annotations

import re

import httpx

from relay.config import Route
from relay.net.routing import RouteTable

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_UNSAFE_LOCATION = re.compile(r"[\\\x00-\x20\x7f]")


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def rewrite_location(location: str, base: httpx.URL, routes: RouteTable) -> str:
    """Map a Location below any route's upstream base onto relay's own path for it.

    A Location that does not parse is passed on unchanged: it is the upstream's answer, and
    relay has nothing to map.
    """
    try:
        absolute = str(base.join(location))
    except (httpx.InvalidURL, ValueError, UnicodeError):
        return location
    for upstream, route in routes.by_upstream():
        if absolute.startswith(upstream):
            return route.prefix + absolute[len(upstream) :]
    return location


def rewrite_location_headers(
    headers: list[tuple[bytes, bytes]], base: httpx.URL, routes: RouteTable
) -> list[tuple[bytes, bytes]]:
    """A passed-on redirect's headers (lower-case names, as relayed) with its Location mapped
    by `rewrite_location` against `base`, the URL that answered."""
    return [
        (name, _rewrite_raw(value, base, routes) if name == b"location" else value)
        for name, value in headers
    ]


def _rewrite_raw(value: bytes, base: httpx.URL, routes: RouteTable) -> bytes:
    return rewrite_location(value.decode("latin-1"), base, routes).encode("latin-1")


def next_hop(response: httpx.Response, route: Route) -> httpx.URL:
    """The URL to follow to, or ValueError saying why relay will not."""
    location = response.headers.get("location")
    if not location:
        raise ValueError("redirect without Location")
    # A backslash is a path separator to browsers (WHATWG) but userinfo to httpx
    # ("http://h\\@127.0.0.1/" goes to 127.0.0.1 for one and "h" for the other): refused.
    if _UNSAFE_LOCATION.search(location):
        raise ValueError("malformed Location")
    try:
        url = response.request.url.join(location)
        port = url.port
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise ValueError("malformed Location") from None
    if port is not None and not 0 < port < 65536:
        raise ValueError("malformed Location")
    if url.userinfo:
        raise ValueError("redirect to a URL with credentials in it")
    if url.scheme not in ("http", "https"):
        raise ValueError("redirect to a URL that is not http(s)")
    if not url.host or not host_allowed(url.host, route.redirect_hosts):
        raise ValueError("redirect to a host not in redirect_hosts")
    return url


def same_origin(a: httpx.URL, b: httpx.URL) -> bool:
    """Whether a and b share scheme, host and port (RFC 6454), default ports made explicit."""
    return (a.scheme, a.host.lower(), _port(a)) == (b.scheme, b.host.lower(), _port(b))


def _port(url: httpx.URL) -> int | None:
    return url.port if url.port is not None else _DEFAULT_PORTS.get(url.scheme)


_DEFAULT_PORTS = {"http": 80, "https": 443}
