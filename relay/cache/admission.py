"""Which requests the cache takes, and the upstream request its fill sends.

`cached_response` is the cache's one entry point for a relayed GET or HEAD: the Hub's LFS
files go to `HubResponse` (keyed by their sha256), a rewriting preset's index pages to
`RewrittenIndex`, other requests of a cached route to `CachedResponse`; None when the cache
does not take the request (it is relayed as without a cache): the route is not cached, an `hf`
route's other answers (shaped per request), or a request carrying the client's own
credentials on a route that forwards them (a response to them is not shared).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import httpx
from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.hub import HubResponse
from relay.cache.key import base_key, encoding_variant
from relay.cache.rewritten import RewrittenIndex, caches_as_index
from relay.cache.serve import CachedResponse
from relay.net.presets import is_hub_file
from relay.net.routing import RouteTable, Target
from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from relay.types import RawHeaders

# Request headers that make the cache relay a request instead of answering it: the client's
# own credentials, when the route forwards them (a response to them is not shared).
_PRIVATE_REQUEST = frozenset({b"authorization", b"cookie"})
# Request headers the cache's own upstream request never carries (it fetches the whole object).
_NOT_FOR_FILLS = frozenset(
    {"range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since"}
)


def fill_request(
    upstream: Upstream, target: Target, headers: Sequence[tuple[str, str]]
) -> httpx.Request:
    """The GET a fill of `target` sends: the request's upstream headers without the client's
    own range and conditionals."""
    fill_headers = [(n, v) for n, v in headers if n.lower() not in _NOT_FOR_FILLS]
    return upstream.build_request("GET", upstream.url_for(target), fill_headers, target.route)


def cached_response(
    cache: Cache,
    upstream: Upstream,
    *,
    method: str,
    target: Target,
    raw_path: bytes,
    query: bytes,
    client_headers: RawHeaders,
    headers: list[tuple[str, str]],
    routes: RouteTable,
    relayed: Callable[[], Response],
    limiter: StreamLimiter,
    client: str | None,
    send_timeout: float,
) -> Response | None:
    """The cache's response to a request for `target` (`headers`: its upstream request
    headers; `client_headers`: the client's own), or None when the cache does not take it."""
    route = target.route
    if not route.cache:
        return None
    if is_hub_file(route, target.rest):
        # The Hub's LFS files, keyed by their sha256 (relay/cache/hub.py).
        return HubResponse(
            cache,
            upstream,
            method=method,
            target=target,
            headers=headers,
            client_headers=httpx.Headers(client_headers),
            fallback=relayed,
            limiter=limiter,
            client=client,
            send_timeout=send_timeout,
        )
    if (
        # The Hub's other answers are shaped per request (its metadata headers kept
        # through redirects): relayed. Its LFS files went to HubResponse above.
        # pypi/npm index pages are cached as the upstream sent them (RewrittenIndex).
        route.preset == "hf"
        or (
            route.forward_client_auth
            and any(name.lower() in _PRIVATE_REQUEST for name, _ in client_headers)
        )
    ):
        return None
    parsed_headers = httpx.Headers(client_headers)
    base = base_key(route.prefix, raw_path, query)
    cached = functools.partial(
        CachedResponse,
        cache,
        method=method,
        base=base,
        variant=encoding_variant(parsed_headers.get("accept-encoding")),
        route=route,
        request=lambda: fill_request(upstream, target, headers),
        client_headers=parsed_headers,
        fallback=relayed,
        limiter=limiter,
        client=client,
        send_timeout=send_timeout,
    )
    if caches_as_index(route, target.rest):
        return RewrittenIndex(
            cached,
            cache=cache,
            base=base,
            route=route,
            routes=routes,
            request_headers=headers,
            client_headers=parsed_headers,
            fallback=relayed,
        )
    return cached()
