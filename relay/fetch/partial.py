"""Where relay fetch writes: FILE.part with its sidecar (resumable, published atomically), or
stdout."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol

from relay.fetch.errors import LocalError, TransferFailed
from relay.fetch.progress import format_size

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no advisory lock on the partial
    fcntl = None  # type: ignore[assignment]

_READ_CHUNK = 1 << 20
_PART, _META = ".part", ".part.json"


@dataclass(frozen=True)
class Meta:
    """What FILE.part.json remembers: the partial's bytes belong to this URL and validator."""

    url: str
    validator: str | None  # for If-Range; None: the server does not support resuming
    total: int | None  # the full size, when the server said

    def dumps(self) -> str:
        return json.dumps({"url": self.url, "validator": self.validator, "total": self.total})

    @classmethod
    def loads(cls, text: str) -> Meta | None:
        try:
            doc = json.loads(text)
            url, validator, total = doc["url"], doc["validator"], doc["total"]
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(url, str) or not isinstance(validator, str | None):
            return None
        if total is not None and (type(total) is not int or total < 0):
            return None
        return cls(url, validator, total)


class Sink(Protocol):
    size: int

    def write(self, data: bytes) -> None: ...
    def digest(self) -> str: ...
    def restart(self) -> None: ...
    def save_meta(self, meta: Meta) -> None: ...


class PartialFile:
    """FILE.part (locked while open) and its FILE.part.json; publishes to FILE atomically."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.path = final.with_name(final.name + _PART)
        self.meta_path = final.with_name(final.name + _META)
        self.size = 0
        self._hash = hashlib.sha256()
        self._file: IO[bytes] | None = None

    def open(self, url: str, *, resume: bool, note: Callable[[str], None]) -> Meta | None:
        """Create FILE.part exclusively, or take over an existing one.

        Returns the saved Meta when the existing bytes can be resumed (same URL, a validator,
        not longer than the total); they are re-hashed. Otherwise the partial is emptied.
        """
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666)
            fresh = True
        except FileExistsError:
            fd = os.open(self.path, flags)
            fresh = False
        self._file = os.fdopen(fd, "r+b")
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._file.close()
                self._file = None
                raise LocalError(f"{self.path} is in use by another relay fetch") from None
        if fresh:
            self._remove_meta()
            return None
        meta = self._load_meta()
        why = None
        if not resume:
            why = "--no-resume"
        elif meta is None:
            why = f"no readable {self.meta_path.name}"
        elif meta.url != url:
            why = f"it was downloaded from {meta.url}"
        elif meta.validator is None:
            why = "the server gave no validator to resume it with"
        if why is None and meta is not None:
            while chunk := self._file.read(_READ_CHUNK):
                self._hash.update(chunk)
                self.size += len(chunk)
            if meta.total is None or self.size <= meta.total:
                if self.size:
                    note(f"resuming {self.path.name} at {format_size(self.size)}")
                return meta
            why = "it is longer than the file"
        if why and os.fstat(fd).st_size:
            note(f"discarding {self.path.name} ({why})")
        self.restart()
        return None

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def restart(self) -> None:
        """Empty the partial (durably, before any new Meta can describe it)."""
        assert self._file is not None
        self._remove_meta()
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._hash = hashlib.sha256()
        self.size = 0

    def save_meta(self, meta: Meta) -> None:
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(meta.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)

    def publish(self) -> None:
        """fsync FILE.part, rename it over FILE, fsync the directory, drop the sidecar."""
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        os.replace(self.path, self.final)
        _fsync_dir(self.final.parent)
        self._file.close()  # the lock is held until FILE is in place
        self._file = None
        self._remove_meta()

    def close(self, *, keep: bool) -> None:
        """Close; keep the partial (and sidecar) for the next run, or remove both."""
        if self._file is None:
            return
        try:
            self._file.close()
        finally:
            self._file = None
            if not keep:
                self.path.unlink(missing_ok=True)
                self._remove_meta()

    def _load_meta(self) -> Meta | None:
        try:
            return Meta.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return None

    def _remove_meta(self) -> None:
        self.meta_path.unlink(missing_ok=True)


class StdoutSink:
    """`-o -`: bytes go straight out; a retry can append but never start over."""

    def __init__(self, out: IO[bytes]) -> None:
        self.size = 0
        self._out = out
        self._hash = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self._out.write(data)
        self._hash.update(data)
        self.size += len(data)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def restart(self) -> None:
        if self.size:
            raise TransferFailed(
                f"cannot start over: {self.size} bytes were already written to stdout"
            )

    def save_meta(self, meta: Meta) -> None:
        pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - e.g. Windows cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
