"""Objects on disk: `cache_dir/objects/<hh>/<sha256 of key>/` holding `meta.json` and `data`.

This module alone knows the on-disk layout and the metadata schema (`Meta`): every other module
asks the `Store` for a path (`data_path`, `partial_path`), to publish a filled object, to
rewrite an object's meta or to remove its files.

An object counts only once its `meta.json` says `complete` (written after the data was
fsynced, atomically); on start anything else is removed. A fill writes `data.partial` beside
the object's `data` and renames it over `data` on completion, so readers of the previous
version keep their open file descriptor: files are unlinked or replaced, never truncated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from relay.cache.key import digest
from relay.disk import remove_quietly, remove_tree, replace, write_atomically

if TYPE_CHECKING:
    from relay.cache.index import Entry

logger = logging.getLogger(__name__)

_META = "meta.json"
_DATA = "data"
_PARTIAL = "data.partial"


@dataclass(slots=True)
class Meta:
    key: str
    url: str
    headers: list[tuple[str, str]]
    """Stored response headers (hop-by-hop, Content-Length and Age removed)."""
    length: int
    stored_at: float
    """Wall-clock time the response (or its last 304) was received."""
    initial_age: float
    lifetime: float
    """Freshness lifetime, from the upstream's headers when received."""
    validator: str | None = None
    sha256: str | None = None
    """The verified SHA-256 of the body, when the upstream announced one."""
    vary: str = ""
    complete: bool = False
    status: int = 200
    extra: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Meta:
        raw = json.loads(data)
        raw["headers"] = [(str(n), str(v)) for n, v in raw["headers"]]
        return cls(**raw)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"

    def prepare(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)

    def directory_of(self, key: str) -> Path:
        """The directory of the object stored under `key`."""
        name = digest(key)
        return self.objects / name[:2] / name

    # ---- one object's files ---------------------------------------------------------------

    @staticmethod
    def data_path(entry: Entry) -> Path:
        """The data file of a stored object."""
        return entry.directory / _DATA

    @staticmethod
    def partial_path(directory: Path) -> Path:
        """The file a fill of the object in `directory` writes."""
        return directory / _PARTIAL

    @staticmethod
    def open_partial(path: Path) -> int:
        """A descriptor to write a fill's partial file (created, or emptied)."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)

    @staticmethod
    def remove_partial(path: Path) -> None:
        """Remove a fill's partial file that was not published (a warning if it stays), and
        the object's directory if that leaves it empty: an answer that is not stored (an
        error, `no-store`) leaves nothing on disk."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cache: cannot remove %s: %s", path, exc)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # fails, as it should, while a stored version is there

    @staticmethod
    def publish(directory: Path, meta: Meta) -> None:
        """Publish a filled object (blocking): the old meta is invalidated first, so no crash
        in between can leave a complete meta beside another version's data."""
        meta.complete = False
        write_atomically(directory / _META, meta.to_json())
        replace(directory / _PARTIAL, directory / _DATA)
        meta.complete = True
        write_atomically(directory / _META, meta.to_json())

    @staticmethod
    def rewrite_meta(entry: Entry) -> None:
        """Write a stored object's meta again (refreshed by a 304); a failure is logged."""
        try:
            write_atomically(entry.directory / _META, entry.meta.to_json())
        except OSError as exc:
            logger.warning("cache: cannot refresh %s: %s", entry.meta.url, exc)

    @staticmethod
    def remove(entry: Entry) -> None:
        """Remove a stored object's files: unlinked, never truncated (a reader streaming it
        keeps its descriptor)."""
        remove_quietly(entry.directory / _META)
        remove_quietly(entry.directory / _DATA)

    # ---- startup --------------------------------------------------------------------------

    def load(self) -> list[tuple[Path, Meta, int]]:
        """Every complete object as (directory, meta, bytes on disk); the rest is removed."""
        found: list[tuple[Path, Meta, int]] = []
        if not self.objects.is_dir():
            return found
        for bucket in self.objects.iterdir():
            if not bucket.is_dir():
                remove_tree(bucket)
                continue
            for directory in bucket.iterdir():
                meta = self._complete(directory)
                if meta is None:
                    remove_tree(directory)
                    continue
                found.append((directory, meta, meta.length))
        return found

    def _complete(self, directory: Path) -> Meta | None:
        try:
            meta = Meta.from_json((directory / _META).read_bytes())
            size = os.stat(directory / _DATA).st_size
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not meta.complete or size != meta.length:
            logger.info("cache: dropping incomplete object %s", directory.name)
            return None
        remove_tree(directory / _PARTIAL)
        return meta
