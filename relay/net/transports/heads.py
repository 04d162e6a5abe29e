"""What an upstream response head must be for relay to relay it; the transport checks here.

The parser under the transport accepts heads relay cannot pass on: aiohttp's takes any three
digits as a status and keeps a transfer coding it does not apply; a control byte in a header
value would make uvicorn fail the response half-written. A head that fails here is refused
before anything reaches the client: a 502 naming the reason. (Written against two parsers,
aiohttp's and h11, when relay had two transports: the rules hold for any parser.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import httpx

# Final statuses relay can relay. 1xx are interim (a 101 would switch protocols, which relay
# does not do); anything outside 100-599 is not HTTP (RFC 9110 15).
MIN_STATUS = 200
MAX_STATUS = 599

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control bytes other than HTAB (RFC 9110 5.5): never valid in a field value.
_CTL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def head_problem(status: int, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """Why relay cannot relay a response with this status and these raw headers, or None."""
    if not MIN_STATUS <= status <= MAX_STATUS:
        return f"status {status} cannot be relayed"
    has_length = has_coding = False
    for name, value in headers:
        lower = name.lower()
        has_length = has_length or lower == b"content-length"
        has_coding = has_coding or lower == b"transfer-encoding"
        if _TOKEN.fullmatch(name) is None:
            return "malformed header name"
        if _CTL.search(value) is not None:
            return "control character in a header value"
        # Only chunked is decoded by the transport; any other transfer coding would hand the
        # client the coded bytes as if they were the body (RFC 9112 6.1).
        if lower == b"transfer-encoding" and any(
            coding.strip().lower() != b"chunked" for coding in value.split(b",")
        ):
            return "unsupported transfer coding"
    if has_length and has_coding:
        # Conflicting framing (RFC 9112 6.3): a parser that goes by Transfer-Encoding (h11
        # did) would relay the upstream's Content-Length to the client with a body of another
        # length. The response is refused whichever parser read it (a request-smuggling shape).
        return "Content-Length with Transfer-Encoding"
    return None


def check_head(request: httpx.Request, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Raise `httpx.RemoteProtocolError` (relay answers 502) for a head relay cannot relay."""
    problem = head_problem(status, headers)
    if problem is not None:
        raise httpx.RemoteProtocolError(f"invalid response: {problem}", request=request)
