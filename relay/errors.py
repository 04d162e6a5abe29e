"""relay's exception tree: one tree for everything the server answers with an error.

    RelayError                 status + short reason (and optional headers, field), never a
    │                          traceback; rendered as plain text for relayed requests
    │                          (`render_text`) and as JSON for the APIs (`render_json`)
    ├── ClientError            4xx: the client's mistake; the upstream is never contacted
    │   ├── BadPath            400: traversal, bad encoding, bad request target
    │   ├── Unauthorized       401: client authentication required and missing
    │   ├── BadHeader          400: a header relay cannot forward unchanged
    │   ├── Forbidden          403: wrong secret, bad or expired signature
    │   ├── NoRoute            404: no configured route serves this path
    │   └── TooManyStreams     429 + Retry-After: max_streams_per_client reached
    ├── Overloaded             503 + Retry-After: max_streams reached; answered at once
    ├── UpstreamError          5xx: upstream trouble before the response started
    │   ├── UpstreamUnavailable  502: refused, reset, DNS failure, bad framing
    │   │   └── UpstreamRefused  502: an answer refusing this request's name (a registry
    │   │                        realm's 4xx for a scope): not a failure of the upstream
    │   ├── PoolExhausted        503 + Retry-After: no free upstream connection in time
    │   ├── UpstreamTimeout      504: no response headers in time
    │   └── MirrorsDown          503 + Retry-After: every mirror of the route is resting
    │                            after failures (passive health); answered at once
    └── DownloadsError         the downloads API (/downloads, /files), 400 unless given:
        ├── InvalidField         400/422: a request field is malformed or refused
        ├── Conflict             409: the name is taken by another download or a different file
        ├── NotFound             404: no such job or file
        ├── InsufficientStorage  507: the store is full (downloads_max_jobs, downloads_max_bytes)
        └── Unavailable          503 (or 404 when disk features are off)

    TransferAborted            the upstream failed after the client response started; the
                               client connection is aborted so the transfer is visibly
                               incomplete (curl exits 18), never a clean short body.

    ConfigError                a setting is invalid; names the key and where it came from.
    StartupError               relay cannot start with what it found (data_dir in use by
                               another process, an unusable job store): one line, no
                               traceback, `relay serve` exits 1.

A job's own outcome (JobFailed) is not an answer to a request: it lives in
`relay.downloads.errors`. `relay fetch` has its exit codes in `relay.fetch.errors`. Both
translate the failures of their transfers (`relay.transfer.errors`) in one place.

Rendering: `render_text` / `render_json` give (status, headers, body bytes); `error_response`
and `json_error_response` wrap them in a Starlette response (imported lazily: `relay fetch`
stays light). Lower-layer errors are translated once per boundary: httpx errors into
UpstreamError in `relay.net.upstream.map_upstream_errors`, routing errors into the downloads
API's in `relay.downloads.intake`, OSError into DiskError in `relay.transfer.partial`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from starlette.responses import Response


class RelayError(Exception):
    status_code: int = 500
    headers: dict[str, str] = {}  # noqa: RUF012 - class-level default, never mutated

    def __init__(
        self, reason: str, *, field: str | None = None, status_code: int | None = None
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field
        if status_code is not None:
            self.status_code = status_code

    def to_json(self) -> dict[str, str]:
        """`{"error": "field: reason", "field": "field"}`, or `{"error": reason}`."""
        out = {"error": f"{self.field}: {self.reason}" if self.field else self.reason}
        if self.field:
            out["field"] = self.field
        return out


class ClientError(RelayError):
    status_code = 400


class BadPath(ClientError):
    status_code = 400


class BadHeader(ClientError):
    status_code = 400


class Unauthorized(ClientError):
    status_code = 401


class Forbidden(ClientError):
    status_code = 403


class NoRoute(ClientError):
    status_code = 404


class TooManyStreams(ClientError):
    status_code = 429
    headers = {"Retry-After": "1"}  # noqa: RUF012


class Overloaded(RelayError):
    status_code = 503
    headers = {"Retry-After": "1"}  # noqa: RUF012


class UpstreamError(RelayError):
    status_code = 502


class UpstreamUnavailable(UpstreamError):
    status_code = 502


class UpstreamRefused(UpstreamUnavailable):
    status_code = 502


class PoolExhausted(UpstreamError):
    status_code = 503
    headers = {"Retry-After": "1"}  # noqa: RUF012


class UpstreamTimeout(UpstreamError):
    status_code = 504


class MirrorsDown(UpstreamError):
    status_code = 503

    def __init__(self, reason: str, *, retry_after: float) -> None:
        super().__init__(reason)
        self.headers = {"Retry-After": str(max(1, int(retry_after + 0.999)))}


class DownloadsError(RelayError):
    status_code = 400


class InvalidField(DownloadsError):
    status_code = 422

    def __init__(self, field: str, reason: str, *, status_code: int | None = None) -> None:
        super().__init__(reason, field=field, status_code=status_code)


class Conflict(DownloadsError):
    status_code = 409


class NotFound(DownloadsError):
    status_code = 404


class InsufficientStorage(DownloadsError):
    status_code = 507


class Unavailable(DownloadsError):
    status_code = 503


class Rendered(NamedTuple):
    """An error answer, ready for any HTTP layer to send."""

    status: int
    headers: dict[str, str]
    body: bytes
    media_type: str


def render_text(exc: RelayError) -> Rendered:
    """For relayed requests: `"{status} {reason}\n"` as text/plain."""
    body = f"{exc.status_code} {exc.reason}\n".encode()
    return Rendered(exc.status_code, dict(exc.headers), body, "text/plain")


def render_json(exc: RelayError, headers: Mapping[str, str] | None = None) -> Rendered:
    """For the APIs: `exc.to_json()` as application/json (compact, like Starlette's)."""
    body = json.dumps(
        exc.to_json(), ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    ).encode("utf-8")
    return Rendered(exc.status_code, {**exc.headers, **(headers or {})}, body, "application/json")


def error_response(exc: RelayError) -> Response:
    """A short plain-text answer naming the cause; never a stack trace."""
    return _starlette_response(render_text(exc))


def json_error_response(exc: RelayError, headers: Mapping[str, str] | None = None) -> Response:
    """The JSON form of `exc`, for the downloads API."""
    return _starlette_response(render_json(exc, headers))


def _starlette_response(rendered: Rendered) -> Response:
    from starlette.responses import Response

    status, headers, body, media_type = rendered
    return Response(body, status, headers=headers, media_type=media_type)


class TransferAborted(Exception):
    """Raised after the response started, to make the ASGI server drop the connection."""


class ConfigError(ValueError):
    pass


class StartupError(Exception):
    """relay cannot start; the message names the file or directory and what to do."""
