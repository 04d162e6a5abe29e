"""relay.cache.heads: the hit path's per-entry parse, made once per stored response and never
outliving it."""

from __future__ import annotations

from pathlib import Path

from relay.cache.heads import head, parsed
from relay.cache.index import Entry
from relay.cache.policy import Answer
from relay.cache.store import Meta


def _meta(etag: str, cache_control: str = "max-age=60") -> Meta:
    return Meta(
        key="k",
        url="http://up.test/a",
        headers=[("ETag", etag), ("Cache-Control", cache_control), ("Content-Type", "x/y")],
        length=3,
        stored_at=0.0,
        initial_age=0.0,
        lifetime=60.0,
        validator=etag,
        complete=True,
    )


def test_parsed_is_kept_until_the_entry_meta_is_replaced(tmp_path: Path) -> None:
    """A refresh (a 304's new Meta put on the same Entry) or a new version is parsed again:
    hits never send the previous response's head."""
    entry = Entry("k", tmp_path / "k.data", _meta('"v1"'))
    first = parsed(entry)
    assert parsed(entry) is first
    assert (b"etag", b'"v1"') in first.head
    assert first.head[-1] == (b"accept-ranges", b"bytes")
    assert first.data == str(tmp_path / "k.data")
    assert not first.must_revalidate
    entry.meta = _meta('"v2"', "no-cache")
    second = parsed(entry)
    assert second is not first
    assert (b"etag", b'"v2"') in second.head
    assert (b"etag", b'"v1"') not in second.head
    assert second.must_revalidate


def test_one_head_builder_for_every_reply() -> None:
    """A 200/206 carries the stored headers, Accept-Ranges, its Content-Range/Length; a 304 only
    what RFC 9110 15.4.5 lists; a 416 no representation type; then Age and Cache-Status."""
    meta = _meta('"v1"')
    whole = head(meta, Answer(200, 0, 3), total=3, age=1.7, status="relay; hit")
    assert whole == [
        (b"etag", b'"v1"'),
        (b"cache-control", b"max-age=60"),
        (b"content-type", b"x/y"),
        (b"accept-ranges", b"bytes"),
        (b"content-length", b"3"),
        (b"age", b"1"),
        (b"cache-status", b"relay; hit"),
    ]
    part = head(meta, Answer(206, 1, 3), total=3, age=0, status="s")
    assert (b"content-range", b"bytes 1-2/3") in part
    assert (b"content-length", b"2") in part
    assert head(meta, Answer(304), total=3, age=0, status="s") == [
        (b"etag", b'"v1"'),
        (b"cache-control", b"max-age=60"),
        (b"age", b"0"),
        (b"cache-status", b"s"),
    ]
    refused = head(meta, Answer(416), total=3, age=0, status="s")
    assert (b"content-type", b"x/y") not in refused
    assert (b"content-range", b"bytes */3") in refused
    assert (b"content-length", b"0") in refused
    unsized = head(meta, Answer(200, 0, -1), total=0, age=0, status="s")
    assert not any(name == b"content-length" for name, _ in unsized)
