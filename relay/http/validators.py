"""Validators (RFC 9110 8.8, 13): which one may guard a resume, and conditional requests."""

from __future__ import annotations

import email.utils

import httpx


def parse_http_date(value: str | None) -> float | None:
    if not value:
        return None
    parsed = email.utils.parsedate_tz(value.strip())
    if parsed is None:
        return None
    try:
        return float(email.utils.mktime_tz(parsed))
    except (OverflowError, ValueError):
        return None


def format_http_date(timestamp: float) -> str:
    return email.utils.formatdate(timestamp, usegmt=True)


def is_strong_etag(value: str) -> bool:
    return len(value) >= 2 and value[0] == value[-1] == '"'


def resume_validator(headers: httpx.Headers) -> str | None:
    """The If-Range value that makes a resume safe, or None when the response has none.

    If-Range needs a strong validator: a strong ETag, or a Last-Modified date at least one
    second older than the response's Date (RFC 9110 8.8.2.2); a weak ETag or a bare date
    could let a changed object's bytes be appended to the old ones.
    """
    etag = str(headers.get("etag", "")).strip()
    if is_strong_etag(etag):
        return etag
    last_modified: str | None = headers.get("last-modified")
    modified = parse_http_date(last_modified)
    date = parse_http_date(headers.get("date"))
    if last_modified and modified is not None and date is not None and modified <= date - 1:
        return last_modified.strip()
    return None


def accepts_byte_ranges(headers: httpx.Headers) -> bool:
    tokens = headers.get_list("accept-ranges", split_commas=True)
    return any(t.strip().lower() == "bytes" for t in tokens)


def none_match(if_none_match: str, etag: str) -> bool:
    """True when `If-None-Match` lists `etag` (weak comparison) or is `*`: answer 304."""
    if if_none_match.strip() == "*":
        return True
    opaque = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == opaque for tag in if_none_match.split(","))


def not_modified_since(if_modified_since: str, last_modified: float) -> bool:
    since = parse_http_date(if_modified_since)
    return since is not None and int(last_modified) <= since


def if_range_holds(if_range: str, etag: str, last_modified: str) -> bool:
    """If-Range: a strong ETag compared strongly, or exactly the Last-Modified date."""
    value = if_range.strip()
    if value.startswith("W/"):
        return False
    if value.startswith('"'):
        return value == etag
    return value == last_modified
