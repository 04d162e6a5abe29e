"""A pypi/npm preset route's index pages through the cache: stored as the upstream sent them,
rewritten for each request as they are served.

The stored object is the upstream's representation (identity: these routes always ask for it;
an encoded index is refused by the fill, as the relayed path refuses it), under the upstream's
freshness like any other object, keyed by the page's negotiated form (`index_accept`: PEP 691
JSON and HTML of one URL, npm's abbreviated and full packuments are kept apart). Each answer is
rewritten on the way out with this request's public base through the relayed path's own
`UrlRewriter`, chunk by chunk, so a page still being filled is rewritten as it arrives, and
memory stays flat whatever the page size. The answer's head is the relayed path's (no
Content-Length, relay's weak ETag for this base, no Accept-Ranges, no digests) plus Age and
Cache-Status. A client's If-None-Match with that ETag is answered 304; a Range is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx
from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.serve import CachedResponse
from relay.config import Route
from relay.http.validators import none_match
from relay.net.presets import is_immutable, is_index_type, rewrites
from relay.net.routing import RouteTable
from relay.proxy.exchange import exchange_of
from relay.proxy.rewrite import (
    REPRESENTATION_HEADERS,
    UrlRewriter,
    public_base,
    rewrite_pairs,
    rewritten_etag,
)
from relay.proxy.streaming import Relayed
from relay.types import ZERO_COPY_SEND, Message, Receive, Scope, Send

# The client's own request headers that do not apply to a rewritten page: its ranges (relay's
# representation has no byte ranges: a 200) and its validators (translated, see below).
_NOT_FOR_PAGES = frozenset(
    {"range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since"}
)
# The cache's answers carry the stored identity representation.
_IDENTITY = "identity"


def caches_as_index(route: Route, rest: str) -> bool:
    """Whether a request for `rest` on `route` is answered as a (possible) index page: a
    rewriting preset's path that is not an immutable file."""
    return rewrites(route) and not is_immutable(route, rest)


class RewrittenIndex(Response):
    """Answers a GET or HEAD of a preset route's index page from the cache, rewritten.

    `make` builds the CachedResponse (with `key`, the page's `index_key`, and this module's
    variant, client headers and fallback); relayed answers (the fallback) are already
    rewritten by the relayed path and pass through untouched. The stored page is the
    upstream's answer to the fill's request, which carries none of this request's headers:
    only its way out depends on this request's public base."""

    def __init__(
        self,
        make: Callable[..., CachedResponse],
        *,
        cache: Cache,
        key: str,
        route: Route,
        routes: RouteTable,
        request_headers: Sequence[tuple[str, str]],
        client_headers: httpx.Headers,
        fallback: Relayed,
    ) -> None:
        self._make = make
        self._cache = cache
        self._key = key
        self._route = route
        self._routes = routes
        self._public = public_base(request_headers)
        self._client_headers = client_headers
        self._fallback = fallback
        self._relayed = False
        self._entry_is_index = False
        self._rewriter: UrlRewriter | None = None
        self._sent = 0
        """Body bytes sent once rewritten (the stored page's count is not what went out)."""
        self.status_code = 0

    def _relay(self, opened: httpx.Response | None = None) -> Response:
        self._relayed = True
        return self._fallback(opened)

    def _cache_request_headers(self) -> httpx.Headers:
        """The client's headers as the cache is to see them: no ranges; an If-None-Match with
        relay's ETag for this base becomes the stored object's own ETag (so a 304 is the
        cache's usual answer, revalidation included); validators that cannot be compared with
        a stored page (a miss, another ETag) are dropped: a full 200 is always right."""
        client = self._client_headers
        headers = httpx.Headers(
            [(n, v) for n, v in client.multi_items() if n.lower() not in _NOT_FOR_PAGES]
        )
        entry = self._cache.lookup(self._key, _IDENTITY)
        if entry is None:
            return headers
        stored = httpx.Headers(entry.meta.headers)
        self._entry_is_index = is_index_type(self._route, stored.get("content-type", ""))
        if not self._entry_is_index:
            # Served unchanged: the client's validators apply as they are.
            for name in ("if-none-match", "if-modified-since"):
                if name in client:
                    headers[name] = client[name]
            return headers
        etag = stored.get("etag")
        inm = client.get("if-none-match")
        if inm is not None:
            if etag and none_match(inm, self._etag(etag)):
                headers["if-none-match"] = etag
        elif "if-modified-since" in client:
            headers["if-modified-since"] = client["if-modified-since"]
        return headers

    def _etag(self, upstream: str) -> str:
        return rewritten_etag(upstream, self._public, self._route.preset)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        inner = self._make(
            base=self._key,
            variant=_IDENTITY,
            client_headers=self._cache_request_headers(),
            fallback=self._relay,
        )

        async def rewriting(message: Message) -> None:
            if self._relayed:
                await send(message)
            elif message["type"] == "http.response.start":
                await send(self._start(message))
            elif message["type"] == "http.response.body" and self._rewriter is not None:
                rewritten = self._body(self._rewriter, message)
                self._sent += len(rewritten["body"])
                await send(rewritten)
            else:
                await send(message)

        # The body is rewritten on its way out, so it cannot be handed to the kernel whole:
        # the cache reads it (its zero-copy send is not offered).
        extensions = {
            name: value
            for name, value in (scope.get("extensions") or {}).items()
            if name != ZERO_COPY_SEND
        }
        try:
            await inner({**scope, "extensions": extensions}, receive, rewriting)
        finally:
            self.status_code = inner.status_code
            if self._rewriter is not None:
                exchange.bytes_sent = self._sent

    def _start(self, message: Message) -> Message:
        status: int = message["status"]
        headers: list[tuple[bytes, bytes]] = list(message["headers"])
        if status == 304:
            index = self._entry_is_index
        else:
            content_type = next((v for n, v in headers if n == b"content-type"), b"")
            index = status == 200 and is_index_type(self._route, content_type.decode("latin-1"))
        if not index:
            return message
        if status == 200:
            self._rewriter = UrlRewriter(rewrite_pairs(self._routes, self._public))
        etag = next((v for n, v in headers if n == b"etag"), None)
        out = [(n, v) for n, v in headers if n not in REPRESENTATION_HEADERS]
        if etag is not None:
            out.append((b"etag", self._etag(etag.decode("latin-1")).encode("latin-1")))
        return {**message, "headers": out}

    @staticmethod
    def _body(rewriter: UrlRewriter, message: Message) -> Message:
        chunk: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if more and not chunk:
            return message  # the wait for the client to drain: nothing to rewrite
        out = rewriter.feed(chunk) if chunk else b""
        if not more:
            out += rewriter.flush()
        return {"type": "http.response.body", "body": out, "more_body": more}
