"""Byte ranges (RFC 9110 14): the upstream's Content-Range, a client's Range."""

from __future__ import annotations

import re
from dataclasses import dataclass

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/(\d+)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class ContentRange:
    start: int
    end: int
    """Inclusive, as on the wire."""
    total: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """`bytes 100-199/1000`; None when absent or malformed."""
    m = _CONTENT_RANGE.fullmatch(value.strip()) if value else None
    if m is None:
        return None
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start or (total is not None and end >= total):
        return None
    return ContentRange(start, end, total)


def parse_unsatisfied_range(value: str | None) -> int | None:
    """The complete length in a 416's `bytes */1000`; None when absent or malformed."""
    m = _UNSATISFIED.fullmatch(value.strip()) if value else None
    return int(m.group(1)) if m else None


class Unsatisfiable(Exception):
    pass


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """A client's single byte range as (start, stop), stop exclusive.

    None means "send the whole file": no Range, a syntax relay does not understand, or several
    ranges (a server may ignore Range, RFC 9110 14.2; relay serves single ranges only).
    Raises Unsatisfiable for a well-formed range that selects nothing (answered with 416).
    """
    if value is None:
        return None
    m = _RANGE.fullmatch(value.strip().replace(" ", ""))
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    first, last = m.group(1), m.group(2)
    if first:
        start = int(first)
        stop = size if not last else min(int(last) + 1, size)
        if last and int(last) < start:
            return None  # invalid range-spec: ignored, like any syntax error
        if start >= size:
            raise Unsatisfiable
        return start, stop
    suffix = int(last)
    if suffix == 0 or size == 0:
        raise Unsatisfiable
    return max(size - suffix, 0), size
