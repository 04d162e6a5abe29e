"""Transparent mid-stream resume: the request that continues a client response.

When the upstream dies or stalls mid-body, relay asks for the rest and keeps writing the same
client response; whether the answer may continue it is decided by `relay.http.continuation` (the
one rule set shared with download jobs and `relay fetch`). This module only builds the
request: the client's own headers, minus the conditionals that could turn it into a 304 or
412, plus the continuation's Range and If-Range. The client never sees a seam: same headers,
same bytes.
"""

from __future__ import annotations

import httpx

from relay.http.authorize import authorized_as
from relay.http.continuation import CONTINUATION, Continuation

# The plan a stream resumes by: what its first response promised.
ResumePlan = Continuation

# Conditional headers that could turn the resumed request into a 304 or 412.
_DROPPED_ON_RESUME = frozenset(
    {"range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since"}
)


def resume_request_headers(
    plan: Continuation, original: httpx.Request, sent: int
) -> list[tuple[str, str]]:
    """The headers of the request that continues `original`'s body after `sent` bytes."""
    headers = [
        (name, value)
        for name, value in original.headers.multi_items()
        if name not in _DROPPED_ON_RESUME and name != "host"
    ]
    return headers + plan.request_headers(sent)


def mark_continuation(
    request: httpx.Request, pinned: str | None, continues: httpx.Request | None = None
) -> httpx.Request:
    """Mark `request` as continuing a body (`CONTINUATION`): it stays on the mirror that sent
    the first bytes unless `pinned`, the SHA-256 the caller verifies before the body ends.
    It is authorized as `continues`, the request it continues, was (`relay.http.authorize`)."""
    request.extensions[CONTINUATION] = pinned or ""
    return request if continues is None else authorized_as(request, continues)
