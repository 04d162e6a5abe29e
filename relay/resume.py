"""Transparent mid-stream resume: continuing a client response after the upstream failed.

When the upstream dies or stalls mid-body, and it offered a strong validator (a strong ETag,
or a Last-Modified a second or more older than its Date) and `Accept-Ranges: bytes`, relay
asks for the rest with `Range: bytes=N-` and `If-Range: <validator>`. Only a 206 whose
Content-Range starts exactly at N, ends where the original would have, and has the same total
continues the client's response; anything else (a 200 because the object changed, a 416,
another range) aborts the client transfer as before. The client never sees a seam: same
headers, same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

from relay.ranges import parse_content_range
from relay.validators import accepts_byte_ranges, resume_validator

# Conditional headers that could turn the resumed request into a 304 or 412.
_DROPPED_ON_RESUME = frozenset(
    {"range", "if-range", "if-none-match", "if-modified-since", "if-match", "if-unmodified-since"}
)


@dataclass(frozen=True, slots=True)
class ResumePlan:
    validator: str
    start: int
    """Offset of the first body byte relayed to the client."""
    end: int | None
    """Offset of the last body byte the client expects (inclusive), if known."""
    total: int | None
    """The representation's complete length, if known."""

    @classmethod
    def for_response(cls, response: httpx.Response) -> ResumePlan | None:
        """A plan if the response can be resumed, else None."""
        if response.request.method != "GET" or not accepts_byte_ranges(response.headers):
            return None
        validator = resume_validator(response.headers)
        if validator is None:
            return None
        if response.status_code == 200:
            length = response.headers.get("content-length")
            total = int(length) if length is not None and length.isdigit() else None
            end = total - 1 if total else None
            return cls(validator=validator, start=0, end=end, total=total)
        if response.status_code == 206:
            parsed = parse_content_range(response.headers.get("content-range"))
            if parsed is None:
                return None  # multipart/byteranges or malformed: not resumable
            return cls(validator=validator, start=parsed.start, end=parsed.end, total=parsed.total)
        return None

    def range_header(self, sent: int) -> str:
        end = "" if self.end is None else str(self.end)
        return f"bytes={self.start + sent}-{end}"

    def request_headers(self, original: httpx.Request, sent: int) -> list[tuple[str, str]]:
        headers = [
            (name, value)
            for name, value in original.headers.multi_items()
            if name not in _DROPPED_ON_RESUME and name != "host"
        ]
        headers.append(("range", self.range_header(sent)))
        headers.append(("if-range", self.validator))
        return headers

    def mismatch(self, response: httpx.Response, sent: int) -> str | None:
        """Why response cannot continue the body after `sent` bytes, or None if it can."""
        if response.status_code != 206:
            return f"resume answered {response.status_code}, not 206"
        parsed = parse_content_range(response.headers.get("content-range"))
        if parsed is None:
            return "resume answered without a single Content-Range"
        if parsed.start != self.start + sent:
            return f"resume started at byte {parsed.start}, not {self.start + sent}"
        if self.end is not None and parsed.end != self.end:
            return f"resume ends at byte {parsed.end}, not {self.end}"
        if self.total is not None and parsed.total != self.total:
            return f"resume total is {parsed.total}, not {self.total}"
        if resume_validator(response.headers) not in (None, self.validator):
            return "validator changed"
        return None
