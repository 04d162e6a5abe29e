"""Optional client authentication, checked before anything reaches an upstream.

Two schemes, either accepted when both are configured:
- a shared secret in a header (how CDNs authenticate to their origin), compared in constant
  time;
- HMAC-signed expiring URLs: `?expires=<unix seconds>&signature=<hex>` where signature is
  HMAC-SHA256(key, "<METHOD>\\n<raw path>\\n<query>\\n<expires>"): the method, the raw path
  as sent, and the raw query as sent minus every `expires` and `signature` parameter (the
  other parameters' bytes in their order, joined by "&", empty parts dropped). A GET
  signature is also valid for HEAD. The two parameters are removed from the query before
  the request goes upstream.

/healthz, /readyz and /metrics stay open: probes and scrapers do not carry credentials.

Admin endpoints (the /downloads API) additionally need the admin credential: `admin_token`
in `admin_header`, compared in constant time (`AdminAuth`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable

from relay.errors import Forbidden, RelayError, Unauthorized, error_response
from relay.types import ASGIApp, Receive, Scope, Send

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_SIGNED_PARAMS = (b"expires", b"signature")


def signature(key: str, method: str, raw_path: str, query: str, expires: int) -> str:
    message = b"\n".join(
        [
            _signed_method(method).encode("ascii"),
            raw_path.encode("latin-1"),
            canonical_query(query.encode("latin-1")),
            str(expires).encode("ascii"),
        ]
    )
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()


def sign(key: str, raw_path: str, expires: int, *, method: str = "GET", query: str = "") -> str:
    """The parameters that make `method raw_path?query` valid until expires (unix seconds).

    Append them to the query: `raw_path?query&<these>`.
    """
    return f"expires={expires}&signature={signature(key, method, raw_path, query, expires)}"


def canonical_query(query: bytes) -> bytes:
    """The query as signed: its parts in their order, minus signature params and empty parts."""
    return b"&".join(
        part for part in query.split(b"&") if part and part.partition(b"=")[0] not in _SIGNED_PARAMS
    )


def _signed_method(method: str) -> str:
    method = method.upper()
    return "GET" if method == "HEAD" else method


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

    def check_registry(self, scope: Scope) -> None:
        """`check`, accepting also a registry client's `Authorization: Basic` whose password
        is the client secret (any user name): container clients can send credentials per
        registry (`docker login`, auth.json), not an arbitrary header."""
        if self._secret:
            for name, value in scope["headers"]:
                if name.lower() == b"authorization" and value[:6].lower() == b"basic ":
                    if hmac.compare_digest(_basic_password(value[6:]), self._secret):
                        return
                    raise Forbidden("wrong client secret")
        self.check(scope)

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
        kept_query = b"&".join(kept)
        expected = signature(
            self._key, scope.get("method", "GET"), raw_path, kept_query.decode("latin-1"), expires
        )
        if not hmac.compare_digest(params.get(b"signature", b"").decode("latin-1"), expected):
            raise Forbidden("bad signature")
        if expires < self._clock():
            raise Forbidden("signature expired")
        return kept_query


def _basic_password(encoded: bytes) -> bytes:
    """The password of a Basic credential (b"" when it does not decode)."""
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except ValueError:
        return b""
    return decoded.partition(b":")[2]


class ClientAuthMiddleware:
    """Checks every request but those of the open paths and, with `skip`, the paths it
    claims (an endpoint that checks its clients itself: the registry API)."""

    def __init__(
        self, app: ASGIApp, auth: ClientAuth, skip: Callable[[str], bool] | None = None
    ) -> None:
        self.app = app
        self.auth = auth
        self.skip = skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and self.auth.enabled
            and scope["path"] not in OPEN_PATHS
            and (self.skip is None or not self.skip(scope["path"]))
        ):
            try:
                self.auth.check(scope)
            except RelayError as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)
