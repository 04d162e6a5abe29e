"""Upstream redirects: passed to the client (default), or followed by relay on an allow-list.

Passed through, a Location that points below a route's upstream base is rewritten to that
route's path on relay, so the client keeps coming through relay. Followed (release assets that
redirect to signed storage URLs), a redirect goes only to hosts on the route's allow-list, over
http(s), through the same egress checks, for at most max_redirects hops; the route's credential
is never sent to another host.
"""

from __future__ import annotations

import httpx

from relay.config import Route
from relay.routing import RouteTable

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})


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
    """Map a Location below any route's upstream base onto relay's own path for it."""
    try:
        absolute = str(base.join(location))
    except (httpx.InvalidURL, ValueError):
        return location
    for route in routes.by_upstream():
        if absolute.startswith(route.upstream):
            return route.prefix + absolute[len(route.upstream) :]
    return location


def next_hop(response: httpx.Response, route: Route) -> httpx.URL:
    """The URL to follow to, or ValueError saying why relay will not."""
    location = response.headers.get("location")
    if not location:
        raise ValueError("redirect without Location")
    url = response.request.url.join(location)
    if url.scheme not in ("http", "https"):
        raise ValueError(f"redirect to a {url.scheme!r} URL")
    if not host_allowed(url.host, route.redirect_hosts):
        raise ValueError(f"redirect to {url.host}, which is not in redirect_hosts")
    return url
