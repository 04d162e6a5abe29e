"""The registry API endpoint: every request under `/v2/` (and `<oci route prefix>v2/`),
whatever its method, comes here instead of the relay catch-all.

It authenticates the client (relay's own client credentials, with a registry client's Basic
too: the password is `client_secret`; a client without them gets relay's own challenge, in
the registry's error format), parses the request strictly (`relay.registry.names`), answers
`/v2/` itself and hands the rest to `RegistryResponse`. Every answer carries
`Docker-Distribution-API-Version: registry/2.0`, and relay's own plain-text errors (a full
relay, a cache fill that could not reach the upstream) leave in the registry's JSON form.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.responses import Response

from relay.cache.cache import Cache
from relay.cache.clock import Clock
from relay.config import Config
from relay.errors import RelayError
from relay.net.routing import RouteTable
from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from relay.proxy.exchange import exchange_of
from relay.proxy.forwarded import ForwardedPolicy
from relay.registry.auth import RegistryAuth
from relay.registry.errors import (
    API_VERSION,
    API_VERSION_HEADER,
    RegistryError,
    error_response,
    render,
)
from relay.registry.names import claims, oci_routes, parse
from relay.registry.relayed import Relaying
from relay.registry.serve import RegistryResponse
from relay.registry.tags import Tags
from relay.registry.upstream import RegistryUpstream
from relay.types import Message, Receive, Scope, Send

#: Largest plain-text error of relay's own turned into the registry form (they are one line).
_MAX_TEXT_ERROR = 4096
_API = (API_VERSION_HEADER.lower().encode(), API_VERSION.encode())
_CODES = {401: "UNAUTHORIZED", 403: "DENIED", 404: "NAME_UNKNOWN", 429: "TOOMANYREQUESTS"}


class Registry:
    """The oci routes' registry API (see the module). `check_client`: relay's client
    authentication (raises Unauthorized/Forbidden), None when clients are not asked for any."""

    def __init__(
        self,
        config: Config,
        limiter: StreamLimiter,
        clock: Clock,
        check_client: Callable[[Scope], None] | None = None,
    ) -> None:
        self._config = config
        self.routes = oci_routes(config.routes)
        self._table = RouteTable(config.routes)
        self._limiter = limiter
        self._clock = clock
        self._check_client = check_client
        self._forwarded = ForwardedPolicy(config.trusted_networks())
        self.tags = Tags(clock)
        self.tag_answers: dict[tuple[str, str], int] = {}
        """(route prefix, outcome) -> answers for tags: hit, revalidated, expired, miss,
        stale (answered stale on an upstream error or 429), pass (no digest upstream)."""
        self.auth: RegistryAuth | None = None
        self._upstream: RegistryUpstream | None = None

    def open(self, upstream: Upstream) -> None:
        """Bind the lifespan's upstream client (at startup)."""
        self.auth = RegistryAuth(upstream, self._clock)
        self._upstream = RegistryUpstream(upstream, self.auth)

    def claims(self, path: str) -> bool:
        return claims(path, self.routes)

    def _count(self, route: str, outcome: str) -> None:
        key = (route, outcome)
        self.tag_answers[key] = self.tag_answers.get(key, 0) + 1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        send = _registry_send(send)
        try:
            if self._check_client is not None:
                self._check_client(scope)
            raw_path = scope.get("raw_path") or scope["path"].encode("ascii", "replace")
            request = parse(scope["method"], raw_path, scope.get("query_string", b""), self.routes)
        except RelayError as exc:
            exchange.outcome = "rejected"
            await error_response(exc)(scope, receive, send)
            return
        if request.route is not None:
            exchange.route = request.route.prefix
        if request.kind == "base":
            await _base()(scope, receive, send)
            return
        assert self._upstream is not None, "Registry.open was not called"
        client = scope.get("client")
        forwarded = self._forwarded.resolve(
            client[0] if client else None, scope.get("scheme", "http"), scope["headers"]
        )
        cache: Cache | None = scope["state"].get("cache")
        relaying = Relaying(
            self._upstream, self._table, self._limiter, self._config, forwarded.client
        )
        response = RegistryResponse(
            relaying,
            request,
            cache=cache,
            tags=self.tags,
            client_headers=scope["headers"],
            count=self._count,
        )
        await response(scope, receive, send)


def _base() -> Response:
    """`GET /v2/`: this client may pull (it passed relay's client authentication)."""
    response = Response(b"{}", 200)
    response.raw_headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"2"),
        _API,
    ]
    return response


def _registry_send(send: Send) -> Send:
    """`send` with the registry's API version header on every answer, and relay's own
    plain-text errors rewritten in the registry's JSON error form."""
    held: Message | None = None
    text = bytearray()

    async def wrapped(message: Message) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = list(message.get("headers", []))
            if (
                message["status"] >= 400
                and (b"content-type", b"text/plain; charset=utf-8") in headers
            ):
                held = message
                return
            if _API[0] not in (name for name, _ in headers):
                headers.append(_API)
            await send({**message, "headers": headers})
            return
        if held is not None and message["type"] == "http.response.body":
            text.extend(message.get("body", b""))
            if message.get("more_body", False) and len(text) <= _MAX_TEXT_ERROR:
                return
            status = held["status"]
            reason = text.decode("utf-8", "replace").strip().removeprefix(str(status)).strip()
            extra = {
                name.decode("latin-1"): value.decode("latin-1")
                for name, value in held.get("headers", [])
                if name in (b"retry-after", b"www-authenticate")
            }
            error = RegistryError(status, _CODES.get(status, "UNAVAILABLE"), reason[:500], extra)
            status, headers, body = render(error)
            held = None
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})
            return
        await send(message)

    return wrapped
