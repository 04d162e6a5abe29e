"""relay.cache.delivery: the hit path's per-entry parse, made once per stored response and never
outliving it."""

from __future__ import annotations

from pathlib import Path

from relay.cache.delivery import parsed
from relay.cache.index import Entry
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
    entry = Entry("k", tmp_path, _meta('"v1"'))
    first = parsed(entry)
    assert parsed(entry) is first
    assert (b"etag", b'"v1"') in first.head
    assert first.head[-1] == (b"accept-ranges", b"bytes")
    assert first.data == str(tmp_path / "data")
    assert not first.must_revalidate
    entry.meta = _meta('"v2"', "no-cache")
    second = parsed(entry)
    assert second is not first
    assert (b"etag", b'"v2"') in second.head
    assert (b"etag", b'"v1"') not in second.head
    assert second.must_revalidate
