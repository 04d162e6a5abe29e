"""relay's exception tree.

    RelayError                 an error answered with a short plain-text body
    ├── ClientError            4xx: the client's mistake; the upstream is never contacted
    │   ├── BadPath            400: traversal, bad encoding, bad request target
    │   ├── Unauthorized       401: client authentication required and missing
    │   ├── BadHeader          400: a header relay cannot forward unchanged
    │   ├── Forbidden          403: wrong secret, bad or expired signature
    │   ├── NoRoute            404: no configured route serves this path
    │   └── TooManyStreams     429 + Retry-After: max_streams_per_client reached
    ├── Overloaded             503 + Retry-After: max_streams reached; answered at once
    └── UpstreamError          5xx: upstream trouble before the response started
        ├── UpstreamUnavailable  502: refused, reset, DNS failure, bad framing
        ├── PoolExhausted        503 + Retry-After: no free upstream connection in time
        └── UpstreamTimeout      504: no response headers in time

    TransferAborted            the upstream failed after the client response started; the
                               client connection is aborted so the transfer is visibly
                               incomplete (curl exits 18), never a clean short body.

    ConfigError                a setting is invalid; names the key and where it came from.
    StartupError               relay cannot start with what it found (data_dir in use by
                               another process, an unusable job store): one line, no
                               traceback, `relay serve` exits 1.

httpx errors are translated into UpstreamError in exactly one place:
`relay.net.upstream.map_upstream_errors`.
"""

from __future__ import annotations


class RelayError(Exception):
    status_code: int = 500
    headers: dict[str, str] = {}  # noqa: RUF012 - class-level default, never mutated

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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


class PoolExhausted(UpstreamError):
    status_code = 503
    headers = {"Retry-After": "1"}  # noqa: RUF012


class UpstreamTimeout(UpstreamError):
    status_code = 504


class TransferAborted(Exception):
    """Raised after the response started, to make the ASGI server drop the connection."""


class ConfigError(ValueError):
    pass


class StartupError(Exception):
    """relay cannot start; the message names the file or directory and what to do."""
