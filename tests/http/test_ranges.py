"""relay.http.ranges: Content-Range as the resume rules read it."""

from __future__ import annotations

from relay.http.ranges import parse_content_range, parse_unsatisfied_range


def test_parse_content_range() -> None:
    """A satisfied range gives start, end and total (or none); "*/N" is a 416's length."""
    parsed = parse_content_range("bytes 10-19/100")
    assert parsed is not None
    assert (parsed.start, parsed.end, parsed.total) == (10, 19, 100)
    assert parse_content_range("bytes */100") is None
    assert parse_unsatisfied_range("bytes */100") == 100
    parsed = parse_content_range("bytes 0-9/*")
    assert parsed is not None
    assert (parsed.start, parsed.end, parsed.total) == (0, 9, None)
    assert parse_content_range("items 0-9/10") is None
    assert parse_unsatisfied_range("items */10") is None
    assert parse_content_range(None) is None
    assert parse_unsatisfied_range(None) is None
