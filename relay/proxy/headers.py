"""Which headers cross relay, in each direction.

Requests: an allow-list. Only headers that shape what the upstream sends (range, validators,
encoding negotiation, user agent) go upstream; cookies and credentials never do by accident.
Responses: everything but hop-by-hop headers, the headers named in `Connection`, and the few
that relay or its server set themselves. Bodies pass unchanged, so Content-Length,
Content-Encoding and ETag pass unchanged too.
"""

from __future__ import annotations

from collections.abc import Iterable

from relay.config import Route
from relay.errors import BadHeader
from relay.net.upstream import USER_AGENT, VIA
from relay.proxy.forwarded import Forwarded
from relay.types import RawHeaders

# RFC 9110 7.6.1, plus the legacy ones that still appear in the wild.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

FORWARDED_REQUEST_HEADERS = frozenset(
    {
        b"accept",
        b"accept-encoding",
        b"cache-control",
        b"if-match",
        b"if-modified-since",
        b"if-none-match",
        b"if-range",
        b"if-unmodified-since",
        b"range",
        b"user-agent",
    }
)

# Set by relay's server (date) or not revealed (server); upstream cookies are never set on
# relay's own origin.
DROPPED_RESPONSE_HEADERS = HOP_BY_HOP | {b"date", b"server", b"set-cookie"}

# Statuses that never carry a body (RFC 9110 6.4.1); a Content-Length on them describes the
# selected representation, which an ASGI server would take as a promise of body bytes.
BODYLESS_STATUSES = frozenset({204, 304})


def connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in Connection, which are hop-by-hop for this message only."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


# Forwarded only where a route says so.
CLIENT_CREDENTIAL_HEADERS = frozenset({b"authorization", b"cookie"})


def upstream_request_headers(
    client_headers: Iterable[tuple[bytes, bytes]],
    *,
    forwarded: Forwarded,
    route: Route,
    request_id: str | None = None,
) -> list[tuple[str, str]]:
    headers = list(client_headers)
    named = connection_tokens(headers)
    allowed = FORWARDED_REQUEST_HEADERS
    if route.forward_client_auth:
        allowed = allowed | CLIENT_CREDENTIAL_HEADERS
    credential_name = route.auth_header.lower().encode() if route.credential else None
    out: list[tuple[str, str]] = []
    via = None
    has_encoding = has_agent = False
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        if name == b"via":
            via = raw_value
            _check_ascii(name, raw_value)
        if name not in allowed or name in named or name == credential_name:
            continue
        _check_ascii(name, raw_value)
        if name == b"accept-encoding":
            if route.preset in ("pypi", "npm"):
                continue  # an index page is rewritten: asked for as identity, below
            has_encoding = True
        elif name == b"user-agent":
            has_agent = True
        out.append((name.decode("latin-1"), raw_value.decode("latin-1")))
    if not has_encoding:
        # httpx would otherwise ask for gzip and relay would hand the client a body it
        # did not ask for; relay passes the representation through, it does not pick one.
        out.append(("accept-encoding", "identity"))
    if not has_agent:
        out.append(("user-agent", USER_AGENT))
    if not forwarded.for_chain.isascii():
        _check_ascii(b"x-forwarded-for", forwarded.for_chain.encode("latin-1"))
    if forwarded.host is not None and not forwarded.host.isascii():
        _check_ascii(b"host", forwarded.host.encode("latin-1"))
    if forwarded.for_chain:
        out.append(("x-forwarded-for", forwarded.for_chain))
    out.append(("x-forwarded-proto", forwarded.proto))
    if forwarded.host is not None:
        out.append(("x-forwarded-host", forwarded.host))
    out.append(("via", (via + b", " + VIA if via else VIA).decode("latin-1")))
    if request_id:
        out.append(("x-request-id", request_id))
    if route.credential:
        out.append((route.auth_header, route.credential))
    return out


def shared_request_headers(
    route: Route,
    *,
    accept_encoding: str,
    accept: str = "",
    client_headers: Iterable[tuple[bytes, bytes]] = (),
) -> list[tuple[str, str]]:
    """The headers of an upstream request whose answer serves more than one client (a cache
    fill, its revalidation, a prefetch, the Hub's metadata request naming a shared object).

    Built from what the cache key holds and nothing a client chose: `accept_encoding` (the
    key's encoding variant), `accept` (an index page's negotiated form, "" for none), the
    route's own credential and relay's fixed identity (User-Agent, Via). No client's
    X-Forwarded-*, request id, User-Agent, Via or Cache-Control reaches it: an upstream that
    builds links or redirects from them (devpi, Nexus and many app servers do) would hand
    one client's host to every client of the shared answer. `client_headers`: read only for
    the client's own Authorization and Cookie, where the route forwards them (the Hub's
    metadata request, whose answer is the asking client's).
    """
    out = [("accept-encoding", accept_encoding), ("user-agent", USER_AGENT)]
    if accept:
        out.append(("accept", accept))
    out.append(("via", VIA.decode("latin-1")))
    if route.forward_client_auth:
        headers = list(client_headers)
        named = connection_tokens(headers)
        credential_name = route.auth_header.lower().encode() if route.credential else None
        for raw_name, raw_value in headers:
            name = raw_name.lower()
            if name in CLIENT_CREDENTIAL_HEADERS and name not in named and name != credential_name:
                _check_ascii(name, raw_value)
                out.append((name.decode("latin-1"), raw_value.decode("latin-1")))
    if route.credential:
        out.append((route.auth_header, route.credential))
    return out


def _check_ascii(name: bytes, value: bytes) -> None:
    """Refuse a value with bytes >= 0x80 (RFC 9110 obs-text) in a header relay forwards.

    Relaying them opaquely, as nginx does, would need the bytes to reach the upstream
    unchanged, and they cannot: httpx encodes str values as ASCII, the aiohttp transport
    writes values as UTF-8 text (a latin-1 "\xe9" would leave as "\xc3\xa9"), and redirects
    and resumes re-read the request's headers as text. A clear 400 beats altered bytes.
    Headers relay does not forward are ignored, whatever they hold.
    """
    if not value.isascii():
        raise BadHeader(f"header {name.decode('latin-1')} has non-ASCII bytes; send it encoded")


def downstream_response_headers(upstream_headers: RawHeaders, status_code: int) -> RawHeaders:
    named = connection_tokens(upstream_headers)
    dropped = DROPPED_RESPONSE_HEADERS | named
    if status_code in BODYLESS_STATUSES:
        dropped = dropped | {b"content-length"}
    out: RawHeaders = []
    via = None
    for raw_name, value in upstream_headers:
        name = raw_name.lower()
        if name in dropped:
            continue
        if name == b"via":
            via = value
            continue
        out.append((name, value))
    out.append((b"via", via + b", " + VIA if via else VIA))
    return out
