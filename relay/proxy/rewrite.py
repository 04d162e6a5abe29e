"""Ecosystem presets while relaying: index bodies rewritten, the Hub's headers kept.

`preset = "pypi"` / `"npm"`: a 200 answer of an index media type (PEP 503 HTML, PEP 691 JSON,
npm packuments) has every absolute URL below a route's upstream base replaced by relay's own
URL for that route (`https://files.pythonhosted.org/x` -> `http://<relay>/pyfiles/x`), so the
client fetches files through relay. The rewrite is a stream: bytes pass through as they come,
with at most the longest base minus one byte held back between chunks (a URL split across two
chunks is still found); nothing is buffered whole, so there is no size cap. Only the URL
prefix changes: `#sha256=` fragments, `hashes`, `integrity` and `data-*` attributes are kept.

A rewritten body is relay's own representation: no Content-Length (sent chunked), a weak ETag
derived from the upstream's and the rewrite rules (none if the upstream had none), no
Accept-Ranges, no digest headers. Rewriting routes ask the upstream for `identity`; an index
that still comes encoded is a 502, never relayed with links pointing past relay. A partial
(206) index cannot be rewritten: 502 too. A body that fails midway is aborted, not resumed.

relay's base URL in the links comes from the request: the Host (or X-Forwarded-Proto/-Host
from a trusted proxy, per `trusted_proxies`); without a usable Host, links are path-only.

`preset = "hf"` (needs `redirects = "follow"`): Xet headers are withheld (`X-Xet-*`,
`Link rel="xet-auth"`) so huggingface_hub downloads over plain HTTP through relay, and the
final answer of a followed redirect carries the Hub's `X-Repo-Commit` / `X-Linked-Etag` /
`X-Linked-Size` from the redirect that had them. Passing the redirect cannot work:
huggingface_hub follows a redirect that stays on its endpoint's host during its metadata
request, and relay's CDN route is on that host, so the CDN's answer would become the metadata.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Sequence

import httpx

from relay.config import Route
from relay.errors import UpstreamUnavailable
from relay.net.presets import hub_metadata, is_index_type, rewrites, without_xet
from relay.net.routing import RouteTable
from relay.net.upstream import REDIRECTED_FROM
from relay.types import RawHeaders

# Headers that describe the upstream's bytes, not the rewritten ones.
REPRESENTATION_HEADERS = frozenset(
    {
        b"content-length",
        b"accept-ranges",
        b"etag",
        b"digest",
        b"content-digest",
        b"repr-digest",
        b"content-md5",
        b"content-range",
    }
)
_SAFE_HOST = re.compile(r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def public_base(request_headers: Sequence[tuple[str, str]]) -> str:
    """relay's own base URL as the client reached it ("" for path-only links).

    Read from the upstream request's X-Forwarded-Proto/-Host, which relay set from the Host
    and the forwarded policy (a client's own X-Forwarded-* are believed only from a trusted
    proxy). A host that is not a plain name or address gives path-only links.
    """
    proto = host = None
    for name, value in request_headers:
        if name == "x-forwarded-proto":
            proto = value
        elif name == "x-forwarded-host":
            host = value
    if proto not in ("http", "https") or host is None or not _SAFE_HOST.match(host):
        return ""
    return f"{proto}://{host}"


class UrlRewriter:
    """Replaces byte prefixes in a stream, whatever the chunk boundaries."""

    def __init__(self, pairs: Sequence[tuple[bytes, bytes]]) -> None:
        ordered = sorted(pairs, key=lambda p: len(p[0]), reverse=True)
        self._map = dict(ordered)
        self._pattern = re.compile(b"|".join(re.escape(old) for old, _ in ordered))
        self._keep = max(len(old) for old, _ in ordered) - 1
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        """The rewritten bytes that can be released; up to the longest prefix minus one byte
        is held back, since a prefix may continue in the next chunk."""
        return self._rewrite(self._carry + chunk, final=False)

    def flush(self) -> bytes:
        return self._rewrite(self._carry, final=True)

    def _rewrite(self, data: bytes, *, final: bool) -> bytes:
        # Every prefix starting before `safe` lies wholly within `data`.
        safe = len(data) if final else len(data) - self._keep
        out: list[bytes] = []
        pos = 0
        for match in self._pattern.finditer(data):
            if match.start() >= safe:
                break
            out.append(data[pos : match.start()])
            out.append(self._map[match.group()])
            pos = match.end()
        cut = max(pos, safe)
        out.append(data[pos:cut])
        self._carry = data[cut:]
        return b"".join(out)


class RewrittenBody:
    """An upstream body iterator, rewritten (a class, not an async generator: nothing is left
    for the event loop to finalise when the consumer stops early)."""

    def __init__(self, raw: AsyncIterator[bytes], rewriter: UrlRewriter) -> None:
        self._raw = raw
        self._rewriter = rewriter
        self._done = False

    def __aiter__(self) -> RewrittenBody:
        return self

    async def __anext__(self) -> bytes:
        while not self._done:
            try:
                chunk = await self._raw.__anext__()
            except StopAsyncIteration:
                self._done = True
                tail = self._rewriter.flush()
                if tail:
                    return tail
                break
            out = self._rewriter.feed(chunk)
            if out:
                return out
        raise StopAsyncIteration


class Preset:
    """What a route's preset does to one upstream answer: `open` decides, `headers` adapts the
    response head, `body` the body iterator."""

    def __init__(self, route: Route, response: httpx.Response, rewriter: UrlRewriter | None):
        self._route = route
        self._response = response
        self._rewriter = rewriter
        self._base = ""

    @property
    def rewrites_body(self) -> bool:
        return self._rewriter is not None

    @classmethod
    def open(
        cls,
        route: Route,
        response: httpx.Response,
        routes: RouteTable,
        request_headers: Sequence[tuple[str, str]],
    ) -> Preset | None:
        """The preset's handling of `response`, None when the route has none; raises
        UpstreamUnavailable for an index relay cannot rewrite."""
        if not route.preset:
            return None
        base = public_base(request_headers)
        rewriter = None
        content_type = response.headers.get("content-type", "")
        if rewrites(route) and is_index_type(route, content_type):
            if response.status_code == 206:
                raise UpstreamUnavailable("upstream sent a partial index page")
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            if response.status_code == 200 and encoding not in ("", "identity"):
                raise UpstreamUnavailable("upstream sent an encoded index page")
            if response.status_code == 200:
                rewriter = UrlRewriter(rewrite_pairs(routes, base))
        preset = cls(route, response, rewriter)
        preset._base = base
        return preset

    def headers(self, headers: RawHeaders) -> RawHeaders:
        out: RawHeaders = [
            (name, value)
            for name, value in headers
            if self._rewriter is None or name not in REPRESENTATION_HEADERS
        ]
        if self._route.preset == "hf":
            out = without_xet(out)
        if self._rewriter is not None:
            etag = self._response.headers.get("etag")
            if etag:
                out.append((b"etag", self._etag(etag).encode("latin-1")))
        if self._route.preset == "hf":
            # With redirects followed: the Hub's file metadata from the redirect that had it.
            hops: list[httpx.Headers] | None = self._response.extensions.get(REDIRECTED_FROM)
            out.extend(hub_metadata(hops or [], {name for name, _ in out}))
        return out

    def body(self, raw: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        if self._rewriter is None:
            return raw
        return RewrittenBody(raw, self._rewriter)

    def _etag(self, upstream: str) -> str:
        return rewritten_etag(upstream, self._base, self._route.preset)


def rewritten_etag(upstream: str, base: str, preset: str) -> str:
    """relay's weak ETag for a page rewritten for `base` from the upstream's `upstream` ETag
    (the relayed path and the cache's serve-time rewrite give the same one)."""
    digest = hashlib.sha256(upstream.encode("latin-1"))
    digest.update(b"\0" + base.encode("latin-1") + b"\0" + preset.encode())
    return f'W/"relay-{digest.hexdigest()[:32]}"'


def rewrite_pairs(routes: RouteTable, base: str) -> list[tuple[bytes, bytes]]:
    pairs: list[tuple[bytes, bytes]] = []
    for old, route in routes.by_upstream():
        new = base + route.prefix
        pairs.append((old.encode("latin-1"), new.encode("latin-1")))
        # JSON may escape "/" as "\/".
        pairs.append(
            (old.replace("/", "\\/").encode("latin-1"), new.replace("/", "\\/").encode("latin-1"))
        )
    return pairs
