"""Answering one registry request: blobs and manifests by digest through the cache (keyed by
the digest alone), tags through their records in the cache and a HEAD, tag lists and
referrers relayed.

- Blob `GET`/`HEAD /v2/<name>/blobs/sha256:<hex>`: with the cache, a content-addressed object
  (`blob_key`: the digest, not the repository or route) answered by `CachedResponse`: one
  coalesced fill for every client (each streamed from the first byte), ranges from what is
  held, a fill that fails mid-body resumed, stored only once its sha256 matched (the last
  chunk held until then; a mismatch aborts every client's transfer and drops the object).
  Before a miss's fill, relay makes sure it carries a token (asking `/v2/` once per route to
  learn whether the registry wants one): a fill is shared, so it cannot do a client's token
  dance. What the cache does not take (a HEAD of a miss, an object over the cache's limit, a
  fill answered 401/404) is relayed by `RegistryRelay`, verified as well. Without the cache,
  every blob is relayed verified.
- Manifest by digest: the same, under `manifest_key` (its own Content-Type kept).
- Manifest by tag: `relay.registry.tags`. A fresh tag answers from the manifest stored by its
  digest (a HEAD from the tag's record alone); a stale or unknown one is checked with a HEAD
  upstream first. The answer's Cache-Status is the tag's (RFC 9211): `hit; ttl=` (fresh),
  `fwd=stale; fwd-status=304` (checked: same digest), `fwd=stale` (moved), `fwd=miss` (new),
  `hit; fwd=stale; fwd-status=<status>; detail="stale-if-error"` (the HEAD failed, 429 or
  5xx or unreachable, and the tag known was answered).
- Tag lists and referrers: relayed, never cached (they change with every push; a pull asks
  for neither).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import httpx
from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.policy import cache_status
from relay.cache.serve import CachedResponse
from relay.config import Route
from relay.errors import RelayError, UpstreamError
from relay.proxy.deciding import decided
from relay.proxy.exchange import exchange_of
from relay.registry.errors import API_VERSION, API_VERSION_HEADER, RegistryError, error_response
from relay.registry.heads import blob_head, listing_head, manifest_head
from relay.registry.names import RegistryRequest
from relay.registry.relayed import RegistryRelay, Relaying
from relay.registry.tags import MANIFEST_TYPES, TagEntry, Tags, normalised_accept
from relay.registry.upstream import refusal, upstream_failure
from relay.types import Message, RawHeaders, Receive, Scope, Send

#: Client headers the cache answers a blob or manifest from (its range and conditionals).
_SHAPING = frozenset({b"range", b"if-range", b"if-none-match", b"if-modified-since"})
#: Client headers that go upstream with a relayed blob (its own range).
_RANGE = frozenset({b"range", b"if-range"})
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_STALE_STATUSES = frozenset({429}) | frozenset(range(500, 600))


def blob_key(sha256: str) -> str:
    """The cache key of a blob: its digest alone (one object, whichever repository or
    registry route asks). The NUL keeps it apart from every URL key."""
    return "oci\x00blob/sha256/" + sha256


def manifest_key(sha256: str) -> str:
    return "oci\x00manifest/sha256/" + sha256


class RegistryResponse(Response):
    """One registry request after parsing: takes the request's stream slot, finds out what
    answers it (which may ask the upstream: a tag's HEAD, a token), then hands the slot to
    that answer."""

    def __init__(
        self,
        relaying: Relaying,
        request: RegistryRequest,
        *,
        cache: Cache | None,
        tags: Tags,
        client_headers: RawHeaders,
        count: Callable[[str, str], None],
    ) -> None:
        self._relaying = relaying
        self._request = request
        route = request.route
        assert route is not None
        self._route: Route = route
        self._cache = cache if cache is not None and route.cache else None
        self._tags = tags
        self._client_headers = client_headers
        self._count = count
        self._status = ""
        """The tag's Cache-Status, which replaces its manifest's."""
        self._outcome = ""
        """The tag's outcome for the access log (hit, revalidated, stale, miss, expired)."""
        self.status_code = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        answer = await decided(
            scope,
            receive,
            send,
            limiter=self._relaying.limiter,
            client=self._relaying.client,
            decide=lambda: self._decide(scope["method"]),
            render=_render,
        )
        if answer is None:
            return
        status = self._status
        try:
            await answer(scope, receive, _with_cache_status(send, status) if status else send)
        finally:
            self.status_code = answer.status_code
            if self._outcome:
                exchange.cache = self._outcome

    # ---- what answers -----------------------------------------------------------------------

    async def _decide(self, method: str) -> Response:
        request = self._request
        if request.kind == "blob":
            return await self._by_digest(method, blob_key, blob_head(request.reference))
        if request.kind == "manifest":
            if request.sha256 is not None:
                return await self._by_digest(
                    method, manifest_key, manifest_head(request.reference), manifest=True
                )
            return await self._tag(method)
        return self._relay(method, adapt=listing_head(request), accept=self._accept())

    async def _by_digest(
        self,
        method: str,
        key_of: Callable[[str], str],
        adapt: Callable[[RawHeaders], RawHeaders],
        *,
        manifest: bool = False,
        path: str | None = None,
    ) -> Response:
        request = self._request
        sha256 = request.sha256 if path is None else path.rpartition(":")[2]
        assert sha256 is not None
        accept = ",".join(MANIFEST_TYPES) if manifest else ""
        cache = self._cache
        if cache is None:
            return self._relay(method, adapt=adapt, accept=accept, sha256=sha256, path=path)
        key = key_of(sha256)
        route = self._route
        ru = self._relaying.upstream
        auth = ru.auth
        if cache.lookup(key, "identity") is None and cache.fill_in_flight(key, "identity") is None:
            # A fill serves every client: it must carry relay's token from its first try.
            authorization = await ru.authorization(route, request.scope, probe=True)
        else:
            authorization = auth.known(route, request.scope)
        headers = ru.headers(accept=accept)

        def fill_request() -> httpx.Request:
            # Each slice's request carries the newest token kept, as long as it is; a 401
            # is answered by a new one (the request's Authorizer, in Upstream.open).
            current = auth.known(route, request.scope) or authorization
            return ru.build("GET", request, headers, current, path=path)

        def fallback(opened: httpx.Response | None = None) -> Response:
            return self._relay(
                method, adapt=adapt, accept=accept, sha256=sha256, path=path, opened=opened
            )

        return CachedResponse(
            cache,
            method=method,
            base=key,
            variant="identity",
            route=route,
            request=fill_request,
            client_headers=httpx.Headers(
                [(n, v) for n, v in self._client_headers if n.lower() in _SHAPING]
            ),
            fallback=fallback,
            limiter=self._relaying.limiter,
            client=self._relaying.client,
            send_timeout=self._relaying.config.send_timeout,
            sha256=sha256,
            adapt=adapt,
        )

    async def _tag(self, method: str) -> Response:
        request = self._request
        accept = self._accept()
        cache = self._cache
        if cache is None:
            return self._relay(method, adapt=manifest_head(None), accept=accept)
        route = self._route
        tags = self._tags
        key = tags.key(route, request.name, request.reference, accept)
        entry = tags.get(cache, key)
        if entry is not None and tags.ttl(entry, route) > 0:
            self._status = cache_status(hit=True, ttl=tags.ttl(entry, route))
            self._counted("hit")
            return await self._tagged(method, entry)
        ru = self._relaying.upstream
        asked_at = tags.now()
        try:
            response = await ru.open("HEAD", request, ru.headers(accept=accept))
        except UpstreamError as exc:
            if entry is None:
                raise
            return await self._stale(method, entry, exc.status_code)
        status = response.status_code
        if status != 200:
            if entry is not None and status in _STALE_STATUSES:
                await asyncio.shield(response.aclose())
                return await self._stale(method, entry, status)
            if status == 404:
                tags.drop(cache, key)
            raise await refusal(response, request)
        await asyncio.shield(response.aclose())
        digest = response.headers.get("docker-content-digest", "").strip()
        length = response.headers.get("content-length", "")
        if not _DIGEST.fullmatch(digest) or not length.isdigit():
            # No digest to key the body by: relayed as it comes (its own Docker-Content-Digest).
            self._counted("pass")
            return self._relay(method, adapt=manifest_head(None), accept=accept)
        if entry is None:
            self._status = cache_status(hit=False, fwd="miss")
            self._counted("miss")
        elif entry.digest != digest:
            self._status = cache_status(hit=False, fwd="stale")
            self._counted("expired")
        else:
            self._status = cache_status(hit=False, fwd="stale", fwd_status=304)
            self._counted("revalidated")
        media_type = response.headers.get("content-type", "")
        answer = TagEntry(digest, media_type, int(length), asked_at)
        entry = await tags.set(cache, key, route, str(response.request.url), answer)
        return await self._tagged(method, entry)

    async def _stale(self, method: str, entry: TagEntry, status: int) -> Response:
        self._status = cache_status(
            hit=True, fwd="stale", fwd_status=status, detail="stale-if-error"
        )
        self._counted("stale")
        return await self._tagged(method, entry)

    async def _tagged(self, method: str, entry: TagEntry) -> Response:
        """The manifest a tag names: a HEAD from what the tag's record says, a GET from the
        manifest stored by digest (fetched by digest if it is not)."""
        if method == "HEAD":
            return _manifest_head(entry)
        path = f"v2/{self._request.name}/manifests/{entry.digest}"
        return await self._by_digest(
            method, manifest_key, manifest_head(entry.digest), manifest=True, path=path
        )

    def _relay(
        self,
        method: str,
        *,
        adapt: Callable[[RawHeaders], RawHeaders],
        accept: str = "",
        sha256: str | None = None,
        path: str | None = None,
        opened: httpx.Response | None = None,
    ) -> Response:
        extra = [
            (n.decode("latin-1"), v.decode("latin-1"))
            for n, v in self._client_headers
            if n.lower() in _RANGE and self._request.kind == "blob" and v.isascii()
        ]
        headers = self._relaying.upstream.headers(accept=accept, extra=extra)
        return RegistryRelay(
            self._relaying,
            method,
            self._request,
            headers,
            adapt=adapt,
            sha256=sha256,
            path=path,
            opened=opened,
        )

    def _counted(self, outcome: str) -> None:
        self._outcome = outcome
        self._count(self._route.prefix, outcome)

    def _accept(self) -> str:
        # Clients send one Accept line per media type (skopeo, containerd): all of them.
        accept = b",".join(v for n, v in self._client_headers if n.lower() == b"accept")
        return normalised_accept(accept.decode("latin-1"))


def _render(exc: RelayError) -> Response:
    return error_response(upstream_failure(exc) if isinstance(exc, UpstreamError) else exc)


def _manifest_head(entry: TagEntry) -> Response:
    response = Response(b"", 200)
    digest = entry.digest.encode()
    response.raw_headers = [
        *([(b"content-type", entry.media_type.encode("latin-1"))] if entry.media_type else []),
        (b"content-length", str(entry.length).encode()),
        (b"docker-content-digest", digest),
        (b"etag", b'"' + digest + b'"'),
        (API_VERSION_HEADER.lower().encode(), API_VERSION.encode()),
    ]
    return response


def _with_cache_status(send: Send, status: str) -> Send:
    """`send` with the response's Cache-Status replaced by the tag's own."""

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [(n, v) for n, v in message.get("headers", []) if n != b"cache-status"]
            headers.append((b"cache-status", status.encode()))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


__all__ = ["RegistryError", "RegistryResponse", "blob_key", "manifest_key"]
