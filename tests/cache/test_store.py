"""relay.cache.store: the on-disk layout, versions, publishing, the record's schema, loading,
removing, disk use; integrity's hashing."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from relay.cache.executor import DiskExecutor
from relay.cache.index import Entry
from relay.cache.integrity import sha256_of_files
from relay.cache.store import Malformed, Meta, Store, decode, encode
from tests.cache.records import DAMAGES


def _meta(key: str, length: int, *, stored_at: float = 0.0) -> Meta:
    return Meta(
        key=key,
        url="http://up.test/a",
        headers=[("ETag", '"v1"')],
        length=length,
        stored_at=stored_at,
        initial_age=0.0,
        lifetime=60.0,
        validator='"v1"',
    )


def _store(tmp_path: Path) -> Store:
    store = Store(tmp_path)
    store.prepare()
    return store


def _fill(store: Store, key: str, body: bytes, *, stored_at: float = 0.0) -> Entry:
    """What a fill does: its own partial file written, then published."""
    partial = store.partial_path(key)
    fd = store.open_partial(partial)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    meta = _meta(key, len(body), stored_at=stored_at)
    data = store.publish(partial, meta)
    return Entry(key, data, meta, store.cost(meta, data))


def _files(store: Store) -> list[str]:
    return sorted(p.name for p in store.objects.rglob("*") if p.is_file())


def test_a_published_version_is_loaded_and_removed(tmp_path: Path) -> None:
    """An object is a pair of files in its bucket (no directory of its own); removing the last
    one removes the bucket."""
    store = _store(tmp_path)
    entry = _fill(store, "k", b"body")
    assert entry.meta.complete
    name = hashlib.sha256(b"k").hexdigest()
    assert entry.data.parent == tmp_path / "objects" / name[:2]
    assert [p.name.split(".")[2] for p in entry.data.parent.iterdir()] in (
        ["data", "meta"],
        ["meta", "data"],
    )
    [(data, loaded, cost)] = store.load()
    assert (data, loaded.key, loaded.complete, cost) == (entry.data, "k", True, entry.cost)
    assert store.data_path(entry).read_bytes() == b"body"
    store.remove(entry)
    assert not entry.data.exists()
    assert list(store.objects.iterdir()) == []
    assert store.load() == []


def test_every_fill_writes_a_file_of_its_own(tmp_path: Path) -> None:
    """Two fills of one key never share a partial file, and a partial file is created
    exclusively: never one someone else opened, never through a planted symlink."""
    store = _store(tmp_path)
    first, second = store.partial_path("k"), store.partial_path("k")
    assert first != second
    assert first.parent == second.parent == store.directory_of("k")
    os.close(store.open_partial(first))
    with pytest.raises(FileExistsError):
        store.open_partial(first)
    second.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        store.open_partial(second)
    assert not (tmp_path / "elsewhere").exists()


def test_publishing_a_version_leaves_the_previous_one_whole(tmp_path: Path) -> None:
    """A new version gets files of its own: the live version's data file is never renamed
    over (a reader of it gets its bytes), and stays until the cache removes it."""
    store = _store(tmp_path)
    old = _fill(store, "k", b"old version")
    reader = os.open(old.data, os.O_RDONLY)
    try:
        new = _fill(store, "k", b"new version", stored_at=1.0)
        assert new.data != old.data
        assert old.data.read_bytes() == b"old version"
        assert os.pread(reader, 100, 0) == b"old version"
        store.remove(old)
        assert os.pread(reader, 100, 0) == b"old version"  # unlinked, never truncated
    finally:
        os.close(reader)
    [(data, meta, _)] = store.load()
    assert (data, data.read_bytes(), meta.stored_at) == (new.data, b"new version", 1.0)


def test_of_two_complete_versions_the_most_recent_is_kept(tmp_path: Path) -> None:
    """A crash between publishing a version and removing the one it replaced leaves both:
    the next start keeps the most recent and removes the other."""
    store = _store(tmp_path)
    old = _fill(store, "k", b"old", stored_at=5.0)
    new = _fill(store, "k", b"new", stored_at=9.0)
    [(data, meta, _)] = store.load()
    assert (data, meta.stored_at) == (new.data, 9.0)
    assert not old.data.exists()
    assert len(_files(store)) == 2


def test_what_a_crash_leaves_is_removed_at_load(tmp_path: Path) -> None:
    """Partial files of fills, temporary records, a data file no record names (its record
    never written), strangers, and a directory per object of the older layout: all removed;
    buckets left empty too."""
    store = _store(tmp_path)
    kept = _fill(store, "k", b"kept")
    bucket = kept.data.parent
    digest = hashlib.sha256(b"k").hexdigest()
    for name in (
        f"{digest}.{'1' * 16}.partial",
        f"{digest}.{'2' * 16}.partial",
        f"{digest}.{'3' * 16}.data",
        f"{digest}.{'4' * 16}.meta.0a1b2c3d.tmp",
        "stranger",
    ):
        (bucket / name).write_bytes(b"x")
    (bucket / "link.data").symlink_to(kept.data)
    legacy = store.objects / "ab" / ("ab" + "0" * 62)
    legacy.mkdir(parents=True)
    (legacy / "meta.json").write_text("{}")
    (legacy / "data").write_bytes(b"old layout")
    (store.objects / "not-a-bucket").write_bytes(b"x")
    [(data, _, _)] = store.load()
    assert data == kept.data
    assert _files(store) == sorted([kept.data.name, kept.data.with_suffix(".meta").name])
    assert sorted(p.name for p in store.objects.iterdir()) == [bucket.name]


def test_a_record_names_its_own_data_file_and_key(tmp_path: Path) -> None:
    """A record copied beside another object's data, or naming a file elsewhere, is not
    trusted."""
    store = _store(tmp_path)
    entry = _fill(store, "k", b"body")
    other = store.directory_of("other") / (
        hashlib.sha256(b"other").hexdigest() + "." + "5" * 16 + ".meta"
    )
    other.parent.mkdir(exist_ok=True)
    other.write_bytes(entry.data.with_suffix(".meta").read_bytes())
    other.with_suffix(".data").write_bytes(b"body")
    [(data, _, _)] = store.load()
    assert data == entry.data
    assert not other.exists()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_malformed_record_is_refused(damage: str) -> None:
    meta = _meta("k", 4)
    meta.complete = True
    record = encode(meta, "d.data")
    assert decode(record, "d.data") == meta
    with pytest.raises(Malformed):
        decode(DAMAGES[damage](record), "d.data")


def test_a_record_round_trips() -> None:
    meta = _meta("k", 4)
    meta.complete = True
    meta.extra = {"total": "100", "first": "0", "variant": "gzip"}
    assert decode(encode(meta, "d.data"), "d.data") == meta


def test_ages_and_lifetimes_beyond_the_schema_are_written_at_its_largest() -> None:
    """An upstream's `max-age=<400 digits>` is stored as the RFC's 2^31 s: what relay writes
    always loads."""
    meta = _meta("k", 4)
    meta.lifetime = meta.initial_age = float("inf")
    loaded = decode(encode(meta, "d.data"), "d.data")
    assert (loaded.lifetime, loaded.initial_age) == (2.0**31, 2.0**31)


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_a_malformed_record_is_discarded_at_load_with_one_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The malformed record and its data file are removed with one warning line; the other
    objects load."""
    store = _store(tmp_path)
    good = _fill(store, "good", b"good body")
    bad = _fill(store, "bad", b"bad!")
    record = bad.data.with_suffix(".meta")
    record.write_bytes(DAMAGES[damage](record.read_bytes()))
    with caplog.at_level(logging.INFO, logger="relay.cache.store"):
        loaded = store.load()
    assert [(d, m.key) for d, m, _ in loaded] == [(good.data, "good")]
    assert not record.exists()
    assert not bad.data.exists()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert record.name in warnings[0].getMessage()


def test_disk_use_is_block_rounded_with_the_record_and_the_directories(tmp_path: Path) -> None:
    """A version costs its data and its record rounded up to the filesystem's block; the
    directories count at their size on disk, a removed bucket no more."""
    store = _store(tmp_path)
    base = store.directory_bytes
    entry = _fill(store, "k", b"x" * 16)
    record = entry.data.with_suffix(".meta")
    assert entry.cost == 2 * store.block
    assert entry.cost == store.blocks(16) + store.blocks(record.stat().st_size)
    bucket = entry.data.parent
    assert store.directory_bytes == base + bucket.stat().st_blocks * 512
    store.remove(entry)
    assert store.directory_bytes == base


async def test_sha256_of_files_joins_them_in_order(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"abc")
    (tmp_path / "b").write_bytes(b"def")
    executor = DiskExecutor(1)
    try:
        joined = await sha256_of_files([tmp_path / "a", tmp_path / "b"], executor)
        assert joined == hashlib.sha256(b"abcdef").hexdigest()
        assert await sha256_of_files([tmp_path / "a", tmp_path / "gone"], executor) is None
    finally:
        executor.shutdown()


def test_a_bucket_removed_under_the_mkdir_of_a_new_fill_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A purge removes a bucket it left empty while a new fill makes it: `mkdir(exist_ok=True)`
    then raises FileExistsError (EEXIST, then the directory gone by its own check). The fill
    makes the bucket again instead of failing (seen as a flaky purge test under load)."""
    store = Store(tmp_path)
    store.prepare()
    path = store.partial_path("k")
    real_mkdir = Path.mkdir
    raced: list[Path] = []

    def mkdir(self: Path, *args: object, **kwargs: object) -> None:
        if self == path.parent and not raced:
            raced.append(self)
            raise FileExistsError(17, "File exists", str(self))
        real_mkdir(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "mkdir", mkdir)
    fd = store.open_partial(path)
    try:
        assert raced == [path.parent]
        assert os.fstat(fd).st_size == 0
        assert path.exists()
    finally:
        os.close(fd)
