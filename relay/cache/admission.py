"""Which requests the cache takes, and the upstream request its fill sends.

`cached_response` is the cache's one entry point for a relayed GET or HEAD: the Hub's LFS
files go to `HubResponse` (keyed by their sha256), a rewriting preset's index pages to
`RewrittenIndex`, other requests of a cached route to `CachedResponse`; None when the cache
does not take the request (it is relayed as without a cache): the route is not cached, an `hf`
route's other answers (shaped per request), or a request carrying the client's own
credentials on a route that forwards them (a response to them is not shared).

A fill's answer serves every client of its key, so its upstream request is built from the key
alone (`fill_request`): the route, the path and query, the key's encoding variant, an index
page's negotiated Accept, the route's credential and relay's own identity. The client's own
headers (its Host as X-Forwarded-Host, X-Forwarded-For/-Proto, the request id, its User-Agent,
Accept, Cache-Control, ranges and conditionals) go only on requests relayed for that client.
"""

from __future__ import annotations

import functools

import httpx
from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.hub import HubResponse
from relay.cache.key import base_key, encoding_variant, index_key
from relay.cache.rewritten import RewrittenIndex, caches_as_index
from relay.cache.serve import CachedResponse
from relay.config import Route
from relay.net.presets import index_accept, is_hub_file, rewrites
from relay.net.routing import RouteTable, Target
from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from relay.proxy.headers import shared_request_headers
from relay.proxy.streaming import Relayed
from relay.types import RawHeaders

# Request headers that make the cache relay a request instead of answering it: the client's
# own credentials, when the route forwards them (a response to them is not shared).
_PRIVATE_REQUEST = frozenset({b"authorization", b"cookie"})


def key_variant(route: Route, accept_encoding: str | None) -> str:
    """The encoding variant a request of `route` is keyed (and filled) by: its Accept-Encoding
    normalised; identity on a rewriting preset's route, which always asks the upstream for
    identity (its index pages are rewritten)."""
    return "identity" if rewrites(route) else encoding_variant(accept_encoding)


def fill_request(
    upstream: Upstream, target: Target, *, variant: str, accept: str = ""
) -> httpx.Request:
    """The GET a fill of `target` sends (a prefetch's too), built from its key alone: the key's
    encoding `variant` as Accept-Encoding, an index page's negotiated `accept`, the route's
    credential and relay's identity; no header of the client whose request started it."""
    route = target.route
    headers = shared_request_headers(route, accept_encoding=variant, accept=accept)
    return upstream.build_request("GET", upstream.url_for(target), headers, route)


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
    relayed: Relayed,
    limiter: StreamLimiter,
    client: str | None,
    send_timeout: float,
) -> Response | None:
    """The cache's response to a request for `target` (`headers`: its upstream request
    headers, for the relayed answer and a rewritten page's public base; `client_headers`: the
    client's own), or None when the cache does not take it."""
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
            client_headers=client_headers,
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
    variant = key_variant(route, _value(parsed_headers, "accept-encoding"))
    index = caches_as_index(route, target.rest)
    # An index page is keyed by its negotiated form, and its fill asks for exactly that form.
    accept = index_accept(route, _value(parsed_headers, "accept")) if index else ""
    cached = functools.partial(
        CachedResponse,
        cache,
        method=method,
        base=base,
        variant=variant,
        route=route,
        request=lambda: fill_request(upstream, target, variant=variant, accept=accept),
        client_headers=parsed_headers,
        fallback=relayed,
        limiter=limiter,
        client=client,
        send_timeout=send_timeout,
    )
    if index:
        return RewrittenIndex(
            cached,
            cache=cache,
            key=index_key(base, accept),
            route=route,
            routes=routes,
            request_headers=headers,
            client_headers=parsed_headers,
            fallback=relayed,
        )
    return cached()


def _value(headers: httpx.Headers, name: str) -> str | None:
    """`headers.get(name)` (several fields joined with ", "), without the KeyError that
    `get` raises and catches inside when the header is absent."""
    values = headers.get_list(name)
    return ", ".join(values) if values else None
