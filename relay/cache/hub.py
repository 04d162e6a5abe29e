"""The Hub's LFS files in the cache, keyed by their sha256.

On an `hf` route with the cache on, a GET or HEAD of `<repo>/resolve/<rev>/<file>` first asks
the Hub, without following its redirect, for the file's metadata (a HEAD carrying the client's
credentials where the route forwards them). That is done for every client request, so the
answer follows the Hub: a branch that moves names new bytes, and a client the Hub refuses gets
the Hub's refusal, whatever is stored.

Of that per-client answer, what is shared is the sha256 (the key) and the Location (the source
of the one fill every client of that sha256 joins); the metadata headers are each answer's
own. So the HEAD, like the fill, carries nothing else of the client (no X-Forwarded-*, request
id, User-Agent, Accept): a Hub that builds its Location from them would send every client's
fill where one client said. The bytes are checked against the sha256 before they are stored.

When the answer (a redirect to the CDN, or the Hub's own 200) carries an `X-Linked-Etag` that
is a sha256, the bytes are content-addressed: stored under the route prefix and that digest
(not the URL), always fresh, answered from the cache (whole, ranges, HEAD, conditionals) with
this answer's `X-Repo-Commit` / `X-Linked-Etag` / `X-Linked-Size` and without Xet's headers. A
miss is one coalesced fill from the redirect's Location (further hops per the route's redirect
policy, no credential to another origin), verified against the sha256 before it is stored.

Anything else the Hub answers (a regular file's 200 without a sha256, 401, 404, 5xx, other
redirects) is relayed as without a cache: the route's relayed response asks again.
"""

from __future__ import annotations

import asyncio
import re

import httpx
from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.key import base_key
from relay.cache.serve import CachedResponse
from relay.config import Route
from relay.errors import error_response
from relay.net.presets import HF_METADATA_HEADERS, hub_metadata, linked_sha256, without_xet
from relay.net.redirects import REDIRECT_STATUSES
from relay.net.routing import Target
from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from relay.proxy.deciding import decided
from relay.proxy.headers import shared_request_headers
from relay.proxy.streaming import Relayed
from relay.types import RawHeaders, Receive, Scope, Send

_PURGE_PATH = re.compile(r"sha256/([0-9a-fA-F]{64})")
_METADATA_NAMES = frozenset(name.encode() for name in HF_METADATA_HEADERS)


def hub_key(route_prefix: str, sha256: str) -> str:
    """The cache key of a content-addressed object of a route (its URL plays no part). It
    starts as the route's URL keys do (a purge of the route prefix drops it) and holds a NUL
    after that, which no request path has: no URL is ever looked up as it."""
    return base_key(route_prefix, route_prefix.encode("latin-1"), b"") + "\x00sha256/" + sha256


def hub_key_of_purge(route: Route, rest: str) -> str | None:
    """The key an admin purge of `<hf route>/sha256/<64 hex>` names, None for other paths."""
    match = _PURGE_PATH.fullmatch(rest)
    if route.preset != "hf" or match is None:
        return None
    return hub_key(route.prefix, match.group(1).lower())


class HubResponse(Response):
    """A Hub file request on a cached `hf` route: the Hub's metadata first (under the
    request's stream slot), then a CachedResponse of the content-addressed object or the
    route's relayed response, handed that slot."""

    def __init__(
        self,
        cache: Cache,
        upstream: Upstream,
        *,
        method: str,
        target: Target,
        client_headers: RawHeaders,
        fallback: Relayed,
        limiter: StreamLimiter,
        client: str | None,
        send_timeout: float,
    ) -> None:
        self._cache = cache
        self._upstream = upstream
        self._method = method
        self._target = target
        self._route: Route = target.route
        # The client's own range and conditionals are answered from the stored object.
        self._hub_headers = shared_request_headers(
            self._route, accept_encoding="identity", client_headers=client_headers
        )
        self._client_headers = httpx.Headers(client_headers)
        self._fallback = fallback
        self._limiter = limiter
        self._client = client
        self._send_timeout = send_timeout
        self.status_code = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await decided(
            scope,
            receive,
            send,
            limiter=self._limiter,
            client=self._client,
            decide=self._ask_hub,
            render=error_response,
        )
        if answer is None:
            return
        try:
            await answer(scope, receive, send)
        finally:
            self.status_code = answer.status_code

    async def _ask_hub(self) -> Response:
        route = self._route
        hub_file = await HubFile.ask(self._upstream, self._target, self._hub_headers)
        if hub_file is None:
            return self._fallback()
        return CachedResponse(
            self._cache,
            method=self._method,
            base=hub_file.key,
            variant="identity",
            route=route,
            request=hub_file.fill_request,
            client_headers=self._client_headers,
            fallback=self._fallback,
            limiter=self._limiter,
            client=self._client,
            send_timeout=self._send_timeout,
            sha256=hub_file.sha256,
            adapt=hub_file.adapt,
        )


class HubFile:
    """A content-addressed Hub file, as one Hub answer named it."""

    def __init__(
        self,
        upstream: Upstream,
        route: Route,
        sha256: str,
        source: httpx.Request,
        metadata: httpx.Headers,
    ) -> None:
        self.sha256 = sha256
        self.key = hub_key(route.prefix, sha256)
        self._upstream = upstream
        self._route = route
        self._source = source
        self._metadata = metadata

    @classmethod
    async def ask(
        cls, upstream: Upstream, target: Target, headers: list[tuple[str, str]]
    ) -> HubFile | None:
        """Ask the Hub (a HEAD, its redirect not followed) about the file; None when its
        answer does not name the bytes by a sha256. Raises UpstreamError."""
        route = target.route
        request = upstream.build_request("HEAD", upstream.url_for(target), headers, route)
        response = await upstream.open(request, route, follow=False)
        try:
            sha256 = linked_sha256(response.headers)
            if sha256 is None:
                return None
            if response.status_code == 200:
                return cls(upstream, route, sha256, request, response.headers)  # the Hub's bytes
            if response.status_code in REDIRECT_STATUSES:
                source = upstream.redirected(request, response, route)
                return cls(upstream, route, sha256, source, response.headers)
            return None
        finally:
            await asyncio.shield(response.aclose())

    def fill_request(self) -> httpx.Request:
        """The GET of the bytes: the Location (or the Hub URL) with the metadata request's
        headers (relay's identity, credentials only where `Upstream.redirected` kept them),
        asked for as stored (identity)."""
        headers = [
            (name, value)
            for name, value in self._source.headers.multi_items()
            if name not in ("host", "accept-encoding")
        ]
        headers.append(("accept-encoding", "identity"))
        return self._upstream.build_request("GET", self._source.url, headers, self._route)

    def adapt(self, headers: RawHeaders) -> RawHeaders:
        """A stored answer's headers: Xet's withheld, the Hub metadata of this answer (the
        commit asked for now, not the one the object was stored under)."""
        kept = [(n, v) for n, v in without_xet(headers) if n not in _METADATA_NAMES]
        return kept + hub_metadata([self._metadata], set())
