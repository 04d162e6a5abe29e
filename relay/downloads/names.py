"""Names on disk: job ids, published file names, and the data directory that holds them.

Every path relay writes is built here from a server-generated id or from a name that passed
`check_name`, then resolved and checked to sit directly inside its directory, so neither a
client's name nor a symlink planted in the data directory can point a write elsewhere.
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from urllib.parse import unquote

from relay.errors import InvalidField

NAME_PATTERN = "[A-Za-z0-9._-]{1,200}, not starting with '.'"
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_JOB_ID = re.compile(r"[0-9a-f]{32}")
PARTIAL_SUFFIX = ".partial"
DEFAULT_NAME = "download"


def new_job_id() -> str:
    return uuid.uuid4().hex


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


def is_name(text: str) -> bool:
    return _NAME.fullmatch(text) is not None


def check_name(value: object, field: str = "name") -> str:
    """A client-given file name, accepted only from a strict allow-list."""
    if not isinstance(value, str) or not is_name(value):
        raise InvalidField(field, f"must match {NAME_PATTERN}", status_code=400)
    return value


def name_from_path(path: str) -> str:
    """A file name derived from the last segment of a URL path, made safe."""
    segment = unquote(path.split("?", 1)[0].rstrip("/").rpartition("/")[2])
    name = _UNSAFE.sub("_", segment).lstrip(".")[:200]
    return name if is_name(name) else DEFAULT_NAME


class DataDir:
    """The layout of `data_dir`: the job store, `partial/{id}.partial` and `files/{name}`."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.partial_dir = self.root / "partial"
        self.files_dir = self.root / "files"
        self.store_path = self.root / "jobs.sqlite3"

    def create(self) -> None:
        for directory in (self.root, self.partial_dir, self.files_dir):
            directory.mkdir(mode=0o750, parents=True, exist_ok=True)

    def partial(self, job_id: str) -> Path:
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return _inside(self.partial_dir, job_id + PARTIAL_SUFFIX)

    def file(self, name: str) -> Path:
        if not is_name(name):
            raise ValueError(f"not a file name: {name!r}")
        return _inside(self.files_dir, name)

    def orphan_partials(self, keep: set[str]) -> list[Path]:
        """Partial files in partial/ that belong to no job in `keep`."""
        out = []
        for entry in self.partial_dir.iterdir():
            job_id = entry.name.removesuffix(PARTIAL_SUFFIX)
            if entry.name.endswith(PARTIAL_SUFFIX) and is_job_id(job_id) and job_id not in keep:
                out.append(entry)
        return out


def _inside(directory: Path, name: str) -> Path:
    candidate = (directory / name).resolve()
    if candidate.parent != directory.resolve():
        raise ValueError(f"{name!r} resolves outside {directory}")
    return candidate
