"""The registry's error format: `{"errors": [{"code": ..., "message": ...}]}` with the status
of the OCI distribution spec, for every answer relay gives under `/v2/`.

relay's own errors (`relay.errors`) map onto registry codes here, in one place
(`from_relay_error`): a refused client is UNAUTHORIZED (with relay's own Basic challenge,
never an upstream's) or DENIED, a full relay UNAVAILABLE or TOOMANYREQUESTS, an upstream that
failed before the answer started UNAVAILABLE with its 502/503/504.
"""

from __future__ import annotations

import json

from starlette.responses import Response

from relay.errors import (
    ClientError,
    Forbidden,
    RelayError,
    TooManyStreams,
    Unauthorized,
)

API_VERSION_HEADER = "Docker-Distribution-API-Version"
API_VERSION = "registry/2.0"
#: relay's own challenge to a client without relay's client credentials.
RELAY_CHALLENGE = 'Basic realm="relay"'


class RegistryError(RelayError):
    """An answer in the registry's error format: `code` is the spec's error code."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.code = code
        self.headers = dict(headers or {})


def name_invalid(message: str) -> RegistryError:
    return RegistryError(400, "NAME_INVALID", message)


def digest_invalid(message: str) -> RegistryError:
    return RegistryError(400, "DIGEST_INVALID", message)


def name_unknown(message: str) -> RegistryError:
    return RegistryError(404, "NAME_UNKNOWN", message)


def unsupported(message: str) -> RegistryError:
    return RegistryError(405, "UNSUPPORTED", message, {"Allow": "GET, HEAD"})


def from_relay_error(exc: RelayError) -> RegistryError:
    """The registry form of one of relay's errors."""
    if isinstance(exc, RegistryError):
        return exc
    status = exc.status_code
    if isinstance(exc, Unauthorized):
        return RegistryError(401, "UNAUTHORIZED", exc.reason, {"WWW-Authenticate": RELAY_CHALLENGE})
    if isinstance(exc, Forbidden):
        return RegistryError(403, "DENIED", exc.reason)
    if isinstance(exc, TooManyStreams):
        return RegistryError(429, "TOOMANYREQUESTS", exc.reason, exc.headers)
    if isinstance(exc, ClientError):
        code = "NAME_UNKNOWN" if status == 404 else "NAME_INVALID"
        return RegistryError(status, code, exc.reason, exc.headers)
    return RegistryError(status, "UNAVAILABLE", exc.reason, exc.headers)


def render(exc: RelayError) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, raw headers, body) of the registry answer for `exc`."""
    error = from_relay_error(exc)
    body = json.dumps(
        {"errors": [{"code": error.code, "message": error.reason}]}, separators=(",", ":")
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (API_VERSION_HEADER.lower().encode(), API_VERSION.encode()),
    ]
    headers.extend((k.lower().encode(), v.encode("latin-1")) for k, v in error.headers.items())
    return error.status_code, headers, body


def error_response(exc: RelayError) -> Response:
    """A Starlette response of the registry answer for `exc`."""
    status, headers, body = render(exc)
    response = Response(body, status)
    response.raw_headers = headers
    return response
