"""Objects on disk: `cache_dir/objects/<hh>/<sha256 of key>/` holding `meta.json` and `data`.

An object counts only once its `meta.json` says `complete` (written after the data was
fsynced, atomically); on start anything else is removed. A fill writes `data.partial` beside
the object's `data` and renames it over `data` on completion, so readers of the previous
version keep their open file descriptor: files are unlinked or replaced, never truncated.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from relay.disk import remove_tree, write_atomically

logger = logging.getLogger(__name__)

META = "meta.json"
DATA = "data"
PARTIAL = "data.partial"


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

    def dir_for(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest

    def write_meta(self, directory: Path, meta: Meta) -> None:
        write_atomically(directory / META, meta.to_json())

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
            meta = Meta.from_json((directory / META).read_bytes())
            size = os.stat(directory / DATA).st_size
        except (OSError, ValueError, TypeError, KeyError):
            return None
        if not meta.complete or size != meta.length:
            logger.info("cache: dropping incomplete object %s", directory.name)
            return None
        remove_tree(directory / PARTIAL)
        return meta
