"""relay.cache.store: the on-disk layout, publishing, loading, removing; integrity's hashing."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from relay.cache.executor import DiskExecutor
from relay.cache.index import Entry
from relay.cache.integrity import sha256_of_files
from relay.cache.store import Meta, Store


def _meta(key: str, length: int) -> Meta:
    return Meta(
        key=key,
        url="http://up.test/a",
        headers=[("ETag", '"v1"')],
        length=length,
        stored_at=0.0,
        initial_age=0.0,
        lifetime=60.0,
        validator='"v1"',
    )


def _fill(store: Store, key: str, body: bytes) -> tuple[Path, Meta]:
    """What a fill does: its partial file written, then published."""
    directory = store.directory_of(key)
    directory.mkdir(parents=True)
    partial = store.partial_path(directory)
    fd = store.open_partial(partial)
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    meta = _meta(key, len(body))
    store.publish(directory, meta)
    return directory, meta


def test_a_published_object_is_loaded_and_removed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    directory, meta = _fill(store, "k", b"body")
    assert meta.complete
    assert not store.partial_path(directory).exists()
    [(loaded_dir, loaded, size)] = store.load()
    assert (loaded_dir, loaded.key, loaded.complete, size) == (directory, "k", True, 4)
    entry = Entry("k", directory, loaded)
    assert store.data_path(entry).read_bytes() == b"body"
    store.remove(entry)
    assert not store.data_path(entry).exists()
    assert store.load() == []


def test_an_unpublished_fill_is_removed_at_load(tmp_path: Path) -> None:
    store = Store(tmp_path)
    store.prepare()
    directory = store.directory_of("k")
    directory.mkdir(parents=True)
    store.partial_path(directory).write_bytes(b"half")
    assert store.load() == []
    assert not directory.exists()


def test_directories_are_named_by_the_key_digest(tmp_path: Path) -> None:
    store = Store(tmp_path)
    name = hashlib.sha256(b"k").hexdigest()
    assert store.directory_of("k") == tmp_path / "objects" / name[:2] / name


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
