from __future__ import annotations

import errno
import hashlib
import io
import os
from pathlib import Path

import pytest

from relay import disk


def test_open_exclusive_creates_a_new_file(tmp_path: Path) -> None:
    """A fresh name is created empty and writable."""
    path = tmp_path / "a.partial"
    with disk.open_exclusive(path) as fh:
        fh.write(b"abc")
    assert path.read_bytes() == b"abc"


def test_open_exclusive_refuses_an_existing_file(tmp_path: Path) -> None:
    """If the name exists, nothing is opened and the existing bytes are untouched."""
    path = tmp_path / "a.partial"
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        disk.open_exclusive(path)
    assert path.read_bytes() == b"theirs"


def test_open_exclusive_refuses_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink at the name (even a dangling one) is never written through."""
    target = tmp_path / "elsewhere"
    link = tmp_path / "a.partial"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        disk.open_exclusive(link)
    assert not target.exists()


def test_publish_moves_src_to_dst(tmp_path: Path) -> None:
    """After publish, dst holds the bytes and src is gone."""
    src, dst = tmp_path / "x.partial", tmp_path / "x"
    src.write_bytes(b"payload")
    disk.publish(src, dst)
    assert dst.read_bytes() == b"payload"
    assert not src.exists()


def test_publish_never_overwrites(tmp_path: Path) -> None:
    """If dst exists, publish raises FileExistsError and leaves both files as they were."""
    src, dst = tmp_path / "x.partial", tmp_path / "x"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    with pytest.raises(FileExistsError):
        disk.publish(src, dst)
    assert dst.read_bytes() == b"old"
    assert src.read_bytes() == b"new"


def test_publish_without_hard_links_falls_back_to_a_checked_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a filesystem refusing link(), publish still moves, and still never overwrites."""

    def no_link(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EPERM, "links not supported")

    monkeypatch.setattr(os, "link", no_link)
    src, dst = tmp_path / "x.partial", tmp_path / "x"
    src.write_bytes(b"new")
    disk.publish(src, dst)
    assert dst.read_bytes() == b"new"
    assert not src.exists()
    src.write_bytes(b"newer")
    with pytest.raises(FileExistsError):
        disk.publish(src, dst)
    assert dst.read_bytes() == b"new"


def test_publish_fsyncs_src_and_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file's data is fsynced before it gets its name, and the directory after."""
    src, dst = tmp_path / "x.partial", tmp_path / "x"
    src.write_bytes(b"payload")
    events: list[str] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "fsync-file")
        real_fsync(fd)

    def link(*args: object, **kwargs: object) -> None:
        events.append("link")
        real_link(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "link", link)
    disk.publish(src, dst)
    assert events == ["fsync-file", "link", "fsync-dir"]


def test_replace_overwrites(tmp_path: Path) -> None:
    """replace is the overwriting variant (for --force)."""
    src, dst = tmp_path / "x.part", tmp_path / "x"
    src.write_bytes(b"new")
    dst.write_bytes(b"old")
    disk.replace(src, dst)
    assert dst.read_bytes() == b"new"
    assert not src.exists()


def test_fsync_dir_on_a_directory(tmp_path: Path) -> None:
    """fsync_dir accepts a directory."""
    disk.fsync_dir(tmp_path)


def test_fsync_dir_of_a_missing_directory_raises(tmp_path: Path) -> None:
    """A missing directory is a real error on POSIX, not silently skipped."""
    with pytest.raises(FileNotFoundError):
        disk.fsync_dir(tmp_path / "missing")


def test_remove_quietly(tmp_path: Path) -> None:
    """Removes a file; a second call on the missing name is fine."""
    path = tmp_path / "x"
    path.write_bytes(b"x")
    disk.remove_quietly(path)
    assert not path.exists()
    disk.remove_quietly(path)


def test_hashing_writer_hashes_what_it_writes(tmp_path: Path) -> None:
    """sha256 and size describe exactly the bytes written to the file."""
    path = tmp_path / "x"
    chunks: list[bytes | bytearray] = [b"a" * 1000, b"", b"bc" * 70_000, bytearray(b"tail")]
    with disk.open_exclusive(path) as fh:
        writer = disk.HashingWriter(fh)
        for chunk in chunks:
            writer.write(chunk)
    data = b"".join(chunks)
    assert path.read_bytes() == data
    assert writer.sha256 == hashlib.sha256(data).hexdigest()
    assert writer.size == len(data)


def test_hashing_writer_resumes_from_existing_bytes(tmp_path: Path) -> None:
    """resume=True hashes the bytes on disk first and appends after them."""
    path = tmp_path / "x"
    head = os.urandom(disk.READ_BLOCK + 17)
    path.write_bytes(head)
    with open(path, "r+b") as fh:
        writer = disk.HashingWriter(fh, resume=True)
        assert writer.size == len(head)
        writer.write(b"more")
    assert path.read_bytes() == head + b"more"
    assert writer.sha256 == hashlib.sha256(head + b"more").hexdigest()


def test_hashing_writer_truncate_starts_over(tmp_path: Path) -> None:
    """truncate empties the file and the digest."""
    path = tmp_path / "x"
    with disk.open_exclusive(path) as fh:
        writer = disk.HashingWriter(fh)
        writer.write(b"discard me")
        writer.truncate()
        writer.write(b"keep")
    assert path.read_bytes() == b"keep"
    assert writer.sha256 == hashlib.sha256(b"keep").hexdigest()
    assert writer.size == 4


def test_hashing_writer_does_not_count_a_failed_write() -> None:
    """A write that raises leaves the digest and size as they were."""

    class Full(io.BytesIO):
        def write(self, data: object) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    writer = disk.HashingWriter(Full())
    with pytest.raises(OSError, match="No space left"):
        writer.write(b"x")
    assert writer.size == 0
    assert writer.sha256 == hashlib.sha256().hexdigest()


def test_hash_file_matches_and_refuses_symlinks(tmp_path: Path) -> None:
    """hash_file hashes a file's contents; it never reads through a symlink."""
    path = tmp_path / "x"
    data = os.urandom(3 * disk.READ_BLOCK // 2)
    path.write_bytes(data)
    state = disk.hash_file(path)
    assert state.hexdigest == hashlib.sha256(data).hexdigest()
    assert state.size == len(data)
    link = tmp_path / "l"
    link.symlink_to(path)
    with pytest.raises(OSError, match="symbolic links") as caught:
        disk.hash_file(link)
    assert caught.value.errno == errno.ELOOP


def test_write_atomically_replaces_the_whole_content(tmp_path: Path) -> None:
    target = tmp_path / "meta.json"
    disk.write_atomically(target, b"old")
    disk.write_atomically(target, b"new content")
    assert target.read_bytes() == b"new content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_write_atomically_never_writes_through_a_planted_temporary_name(tmp_path: Path) -> None:
    """The temporary file has a name of its own, created exclusively: a file or symlink left
    at the old fixed name (`<name>.tmp`) is neither written through nor a collision, and two
    writers of one path never share a temporary file."""
    target = tmp_path / "meta"
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    (tmp_path / "meta.tmp").symlink_to(victim)
    disk.write_atomically(target, b"record")
    assert target.read_bytes() == b"record"
    assert victim.read_bytes() == b"untouched"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta", "meta.tmp", "victim"]


def test_remove_tree_removes_a_directory_or_a_file_and_tolerates_absence(tmp_path: Path) -> None:
    tree = tmp_path / "obj"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "data").write_bytes(b"x")
    single = tmp_path / "file"
    single.write_bytes(b"y")
    disk.remove_tree(tree)
    disk.remove_tree(single)
    disk.remove_tree(tmp_path / "never-there")
    assert list(tmp_path.iterdir()) == []


def test_write_chunks_writes_them_in_order_through_short_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """writev may write less than asked: the rest follows, nothing twice, nothing skipped."""
    real = os.writev

    def at_most_7(fd: int, buffers: list[memoryview]) -> int:
        data = b"".join(bytes(b) for b in buffers)[:7]
        return real(fd, [data])

    monkeypatch.setattr(os, "writev", at_most_7)
    chunks = [b"alpha", b"", b"beta", b"gamma-delta", b"e"]
    with (tmp_path / "f").open("wb") as fh:
        fh.write(b">")  # still in the file object's buffer: written first
        assert disk.write_chunks(fh, chunks) == 21
    assert (tmp_path / "f").read_bytes() == b">alphabetagamma-deltae"


def test_try_lock_is_exclusive_between_open_files(tmp_path: Path) -> None:
    """A second open file of the same path cannot take the lock until the first is closed."""
    path = tmp_path / "locked"
    path.write_bytes(b"")
    with path.open("rb") as first:
        assert disk.try_lock(first.fileno())
        with path.open("rb") as second:
            assert not disk.try_lock(second.fileno())
    with path.open("rb") as third:
        assert disk.try_lock(third.fileno())


def test_truncate_empties_an_open_file(tmp_path: Path) -> None:
    """Emptied and positioned at 0: the next write is byte 0."""
    path = tmp_path / "t"
    with path.open("w+b") as fh:
        fh.write(b"old bytes")
        disk.truncate(fh)
        fh.write(b"new")
    assert path.read_bytes() == b"new"
