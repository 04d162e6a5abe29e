"""Where relay fetch writes: FILE.part with its sidecar (resumable, published atomically), or
stdout."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Protocol

from relay import disk
from relay.fetch.errors import LocalError, TransferFailed
from relay.fetch.progress import format_size

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no advisory lock on the partial
    fcntl = None  # type: ignore[assignment]

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
    @property
    def size(self) -> int: ...

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
        self._writer: disk.HashingWriter | None = None

    @property
    def size(self) -> int:
        return 0 if self._writer is None else self._writer.size

    def open(self, url: str, *, resume: bool, note: Callable[[str], None]) -> Meta | None:
        """Create FILE.part exclusively, or take over an existing one.

        Returns the saved Meta when the existing bytes can be resumed (same URL, a validator,
        not longer than the total); they are re-hashed. Otherwise the partial is emptied.
        """
        file: BinaryIO
        try:
            file = disk.open_exclusive(self.path)
            fresh = True
        except FileExistsError:
            file = os.fdopen(os.open(self.path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0)), "r+b")
            fresh = False
        fd = file.fileno()
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                file.close()
                raise LocalError(f"{self.path} is in use by another relay fetch") from None
        self._writer = disk.HashingWriter(file)
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
            self._writer = disk.HashingWriter(file, resume=True)
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
        assert self._writer is not None
        self._writer.write(data)

    def digest(self) -> str:
        assert self._writer is not None
        return self._writer.sha256

    def restart(self) -> None:
        """Empty the partial (durably, before any new Meta can describe it)."""
        assert self._writer is not None
        self._remove_meta()
        self._writer.truncate()

    def save_meta(self, meta: Meta) -> None:
        tmp = self.meta_path.with_name(self.meta_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(meta.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.meta_path)

    def publish(self) -> None:
        """fsync FILE.part, rename it over FILE, fsync the directory, drop the sidecar.

        Over: FILE was checked before starting (absent, or --force given).
        """
        assert self._writer is not None
        self._writer.sync()
        disk.replace(self.path, self.final)
        self._writer.file.close()  # the lock is held until FILE is in place
        self._remove_meta()

    def close(self, *, keep: bool) -> None:
        """Close; keep the partial (and sidecar) for the next run, or remove both."""
        if self._writer is None or self._writer.file.closed:
            return
        try:
            self._writer.file.close()
        finally:
            if not keep:
                disk.remove_quietly(self.path)
                self._remove_meta()

    def _load_meta(self) -> Meta | None:
        try:
            return Meta.loads(self.meta_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return None

    def _remove_meta(self) -> None:
        disk.remove_quietly(self.meta_path)


class StdoutSink:
    """`-o -`: bytes go straight out; a retry can append but never start over."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = disk.HashingWriter(out)

    @property
    def size(self) -> int:
        return self._out.size

    def write(self, data: bytes) -> None:
        self._out.write(data)

    def digest(self) -> str:
        return self._out.sha256

    def restart(self) -> None:
        if self.size:
            raise TransferFailed(
                f"cannot start over: {self.size} bytes were already written to stdout"
            )

    def save_meta(self, meta: Meta) -> None:
        pass
