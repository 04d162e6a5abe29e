"""Optional client authentication, checked before anything reaches an upstream.

Two schemes, either accepted when both are configured:
- a shared secret in a header (how CDNs authenticate to their origin), compared in constant
  time;
- HMAC-signed expiring URLs: `?expires=<unix seconds>&signature=<hex>` where signature is
  HMAC-SHA256(key, "<raw path>\\n<expires>"). The two parameters are removed from the query
  before the request goes upstream.

/healthz, /readyz and /metrics stay open: probes and scrapers do not carry credentials.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable

from relay.errors import Forbidden, RelayError, Unauthorized
from relay.streaming import error_response
from relay.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_SIGNED_PARAMS = (b"expires", b"signature")


def signature(key: str, raw_path: str, expires: int) -> str:
    message = f"{raw_path}\n{expires}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sign(key: str, raw_path: str, expires: int) -> str:
    """The query string that makes raw_path valid until expires (unix seconds)."""
    return f"expires={expires}&signature={signature(key, raw_path, expires)}"


class ClientAuth:
    def __init__(
        self,
        *,
        secret: str = "",
        secret_header: str = "X-Relay-Secret",  # noqa: S107 - a header name
        signing_key: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._secret = secret.encode()
        self._header = secret_header.lower().encode()
        self._key = signing_key
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return bool(self._secret or self._key)

    def check(self, scope: Scope) -> None:
        """Accept the request or raise Unauthorized/Forbidden; strips signature params."""
        if self._secret:
            for name, value in scope["headers"]:
                if name.lower() == self._header:
                    if hmac.compare_digest(value, self._secret):
                        return
                    raise Forbidden("wrong client secret")
        query: bytes = scope.get("query_string", b"")
        if self._key and b"signature=" in query:
            scope["query_string"] = self._check_signature(scope, query)
            return
        raise Unauthorized("authentication required")

    def _check_signature(self, scope: Scope, query: bytes) -> bytes:
        params: dict[bytes, bytes] = {}
        kept = []
        for part in query.split(b"&"):
            name, _, value = part.partition(b"=")
            if name in _SIGNED_PARAMS:
                if name in params:
                    raise Forbidden("signature parameters given twice")
                params[name] = value
            elif part:
                kept.append(part)
        expires_text = params.get(b"expires", b"")
        if not expires_text.isdigit() or len(expires_text) > 12:
            raise Forbidden("bad or missing expires")
        expires = int(expires_text)
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        expected = signature(self._key, raw_path, expires)
        if not hmac.compare_digest(params.get(b"signature", b"").decode("latin-1"), expected):
            raise Forbidden("bad signature")
        if expires < self._clock():
            raise Forbidden("signature expired")
        return b"&".join(kept)


class ClientAuthMiddleware:
    def __init__(self, app: ASGIApp, auth: ClientAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.auth.enabled and scope["path"] not in OPEN_PATHS:
            try:
                self.auth.check(scope)
            except RelayError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
