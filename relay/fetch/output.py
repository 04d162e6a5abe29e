"""Where relay fetch writes: FILE.part with its resume record FILE.part.json (published to FILE
once verified), or stdout.

FILE.part is a `relay.transfer.PartialFile` (exclusive create, locked while open, hashed as
written). FILE.part.json is what is relay fetch's own: the URL, validator and total the bytes
in FILE.part belong to, so a later run can resume them with Range + If-Range. It is written
before any byte of a representation is appended (atomically, fsynced) and removed before the
partial is emptied, so it never describes bytes of another version.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from relay import disk
from relay.fetch.progress import format_size
from relay.transfer import PartialFile, Representation
from relay.transfer.errors import TransferError

_PART, _RECORD = ".part", ".part.json"


@dataclass(frozen=True)
class ResumeRecord:
    """What FILE.part.json remembers: the partial's bytes belong to this URL and validator."""

    url: str
    validator: str | None  # for If-Range; None: the server does not support resuming
    total: int | None  # the full size, when the server said

    def dumps(self) -> str:
        return json.dumps({"url": self.url, "validator": self.validator, "total": self.total})

    @classmethod
    def loads(cls, text: str) -> ResumeRecord | None:
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


class FileOutput:
    """FILE.part and FILE.part.json; publishes to FILE."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.path = final.with_name(final.name + _PART)
        self.record_path = final.with_name(final.name + _RECORD)
        self._partial: PartialFile | None = None
        self._saved: ResumeRecord | None = None

    @property
    def partial(self) -> PartialFile:
        assert self._partial is not None, "FileOutput.open first"
        return self._partial

    @property
    def size(self) -> int:
        return 0 if self._partial is None else self._partial.size

    async def open(
        self, url: str, *, resume: bool, note: Callable[[str], None]
    ) -> Representation | None:
        """Create FILE.part, or take over an existing one.

        Returns what the record says when the existing bytes can be resumed (same URL, a
        validator, not longer than the total); they are re-hashed. Otherwise the partial is
        emptied and the record removed.
        """
        record = await asyncio.to_thread(self._load_record)
        why = None
        if not resume:
            why = "--no-resume"
        elif record is None:
            why = f"no readable {self.record_path.name}"
        elif record.url != url:
            why = f"it was downloaded from {record.url}"
        elif record.validator is None:
            why = "the server gave no validator to resume it with"
        # Written in place: relay fetch has nothing else to run (see relay.fetch.client).
        self._partial = partial = await PartialFile.open(
            self.path, resume=why is None, write_behind=False
        )
        if why is None and record is not None:
            if record.total is None or partial.size <= record.total:
                if partial.size:
                    note(f"resuming {self.path.name} at {format_size(partial.size)}")
                self._saved = record
                return Representation(validator=record.validator, total=record.total)
            why = "it is longer than the file"
            await self.forget()
            await partial.restart()
        if why and partial.found:
            note(f"discarding {self.path.name} ({why})")
        await self.forget()
        return None

    async def save(self, record: ResumeRecord) -> None:
        """Record what the partial's bytes belong to (before they are appended)."""
        if record != self._saved:
            data = record.dumps().encode()
            await asyncio.to_thread(disk.write_atomically, self.record_path, data)
            self._saved = record

    async def forget(self) -> None:
        """Remove the record (before the partial is emptied)."""
        self._saved = None
        await asyncio.to_thread(disk.remove_quietly, self.record_path)

    async def publish(
        self, *, replace: bool, expected_sha256: str | None, upstream_sha256: str | None
    ) -> str:
        """Verify FILE.part, give it the name FILE, drop the record; returns the digest."""
        digest = await self.partial.publish(
            self.final,
            expected_sha256=expected_sha256,
            upstream_sha256=upstream_sha256,
            replace=replace,
        )
        await self.forget()
        return digest

    async def close(self, *, keep: bool, flush: bool = True) -> int:
        """Close; keep the partial (and record) for the next run, or remove both. Returns the
        bytes kept (0: nothing was kept).

        `flush=False` (after an interruption, which may have cut the write-behind's
        bookkeeping short) keeps only what already reached the disk; the next run re-hashes
        it and fetches the rest.
        """
        partial = self._partial
        if partial is None or partial.closed:
            return 0
        kept = 0
        if keep:
            await partial.close(flush=flush)
            kept = await asyncio.to_thread(_size_on_disk, self.path)
        if not kept:
            await partial.discard()
            await self.forget()
        return kept

    def _load_record(self) -> ResumeRecord | None:
        try:
            return ResumeRecord.loads(self.record_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            return None


def _size_on_disk(path: Path) -> int:
    try:
        return path.lstat().st_size
    except OSError:
        return 0


class StdoutSink:
    """`-o -`: bytes go straight out; a retry can append but never start over."""

    def __init__(self, out: IO[bytes]) -> None:
        self._out = disk.HashingWriter(out)

    @property
    def size(self) -> int:
        return self._out.size

    def hexdigest(self) -> str:
        return self._out.sha256

    async def write(self, data: bytes) -> None:
        self._out.write(data)  # blocking: the pipe's back-pressure is relay fetch's pace

    async def restart(self) -> None:
        if self.size:
            raise TransferError(
                f"cannot start over: {self.size} bytes were already written to stdout"
            )

    def flush(self) -> None:
        self._out.file.flush()
