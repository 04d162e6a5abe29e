"""Objects on disk: `cache_dir/objects/<hh>/`, 256 bucket directories (`hh`: the first two hex
digits of the key's SHA-256), each stored version of an object a pair of files in its bucket,
no directory of its own:

    <sha256 of key>.<version>.data     the body
    <sha256 of key>.<version>.meta     its record: the schema version, the data file's name,
                                       the `Meta` (JSON)
    <sha256 of key>.<version>.partial  a fill being written (becomes `.data` when published)
    <sha256 of key>.<version>.head     with several workers: the record a fill will publish,
                                       written as soon as its head is known, for the workers
                                       that follow it (`relay.cache.workers.follow`)

This module alone knows the layout and the record's schema: every other module asks the
`Store` for a fill's partial file, to publish it, to rewrite stored versions' meta or to
remove their files, and gets paths back. These are blocking: the cache runs them on its own
threads (`relay.cache.executor`).

- Every fill writes a partial file of its own, created exclusively (O_EXCL|O_NOFOLLOW), under
  a version name of its own: a fill never writes into, removes or publishes another's file.
- Publishing links the partial file to its `.data` name (never replacing anything: see
  `relay.disk.publish`), then writes the `.meta` record atomically. A version's files are
  never renamed over nor truncated: a reader of an older version keeps reading that version,
  and the older version's files are removed by the cache once no reader holds them.
- On start a version counts only if its record is valid (`decode`: types, ranges, required
  fields, the schema version, a data file name that is its own) and its data file has the
  recorded length; everything else is removed, a malformed record with one warning line. Of
  several complete versions of one key (a crash between publishing one and removing the
  other) the most recent is kept.
- Disk use (`cost`, `directory_bytes`) is what the files take on disk: sizes rounded up to
  the filesystem's block, metadata included, and the directories' own sizes as the
  filesystem reports them. A bucket left empty is removed.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import secrets
import stat
import threading
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay.cache.key import digest
from relay.cache.policy import DELTA_SECONDS_MAX
from relay.disk import (
    create_exclusive,
    publish,
    remove_quietly,
    remove_tree,
    write_atomically,
)

if TYPE_CHECKING:
    from relay.cache.index import Entry

logger = logging.getLogger(__name__)

SCHEMA = 2
"""The version of the record's schema (1: a directory per object with `meta.json`/`data`)."""

_DATA = ".data"
_META = ".meta"
_PARTIAL = ".partial"
_HEAD = ".head"
_NAME = re.compile(r"([0-9a-f]{64})\.([0-9a-f]{16})(\.data|\.meta|\.partial|\.head)")
_BUCKET = re.compile(r"[0-9a-f]{2}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(r"[^\x00\r\n]*")

MAX_LENGTH = 2**62
"""The largest body length a record may state."""
MAX_SECONDS = DELTA_SECONDS_MAX
"""The largest age or lifetime a record may state (RFC 9111 1.2.2's delta-seconds cap)."""
MAX_TIME = 253402300799.0
"""The latest `stored_at` a record may state (9999-12-31)."""
_META_ALLOWANCE = 4096
"""What a fill reserves for its record before it is written (its real size counts after)."""


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


_FIELDS = frozenset(f.name for f in fields(Meta))
_REQUIRED = frozenset({"key", "url", "headers", "length", "stored_at", "initial_age", "lifetime"})


class Malformed(ValueError):
    """A record that does not follow the schema (the reason is the message)."""


def encode(meta: Meta, data: str) -> bytes:
    """The record of a stored version whose body is the file `data` (a name in its bucket).
    Ages and lifetimes beyond the schema's range are written as its largest value."""
    record: dict[str, Any] = {"schema": SCHEMA, "data": data, **asdict(meta)}
    for name in ("initial_age", "lifetime"):
        record[name] = min(max(float(record[name]), 0.0), MAX_SECONDS)
    return json.dumps(record, separators=(",", ":")).encode()


def decode(raw: bytes, data: str) -> Meta:
    """The Meta of a record that must name the data file `data`; Malformed if anything in it
    is of the wrong type, out of range, missing, unknown, or of another schema version."""
    try:
        record = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise Malformed(f"not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise Malformed("not a JSON object")
    schema = record.pop("schema", None)
    if type(schema) is not int or schema != SCHEMA:
        raise Malformed(f"schema version {schema!r}, not {SCHEMA}")
    if record.pop("data", None) != data:
        raise Malformed("names another data file")
    unknown = set(record) - _FIELDS
    if unknown:
        raise Malformed(f"unknown fields {sorted(unknown)}")
    missing = _REQUIRED - set(record)
    if missing:
        raise Malformed(f"missing fields {sorted(missing)}")
    meta = Meta(
        key=_text(record, "key"),
        url=_text(record, "url"),
        headers=_headers(record.get("headers")),
        length=_integer(record, "length", 0, MAX_LENGTH),
        stored_at=_number(record, "stored_at", MAX_TIME),
        initial_age=_number(record, "initial_age", MAX_SECONDS),
        lifetime=_number(record, "lifetime", MAX_SECONDS),
        validator=_optional_text(record, "validator"),
        sha256=_optional_text(record, "sha256"),
        vary=_text(record, "vary", ""),
        complete=_flag(record, "complete"),
        status=_integer(record, "status", 100, 599, 200),
        extra=_extra(record.get("extra", {})),
    )
    if meta.sha256 is not None and not _SHA256.fullmatch(meta.sha256):
        raise Malformed("sha256 is not a SHA-256")
    for name in ("total", "first"):
        value = meta.extra.get(name)
        if value is not None and not (value.isascii() and value.isdigit() and len(value) < 20):
            raise Malformed(f"extra {name} is not a length")
    return meta


def _text(record: dict[str, Any], name: str, default: str | None = None) -> str:
    value = record.get(name, default)
    if not isinstance(value, str):
        raise Malformed(f"{name} is not a string")
    return value


def _optional_text(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise Malformed(f"{name} is not a string")
    return value


def _flag(record: dict[str, Any], name: str) -> bool:
    value = record.get(name, False)
    if not isinstance(value, bool):
        raise Malformed(f"{name} is not a boolean")
    return value


def _integer(
    record: dict[str, Any], name: str, low: int, high: int, default: int | None = None
) -> int:
    value = record.get(name, default)
    if type(value) is not int:
        raise Malformed(f"{name} is not an integer")
    if not low <= value <= high:
        raise Malformed(f"{name} out of range")
    return value


def _number(record: dict[str, Any], name: str, high: float) -> float:
    value = record.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise Malformed(f"{name} is not a number")
    try:
        number = float(value)
    except OverflowError:
        raise Malformed(f"{name} out of range") from None
    if not (math.isfinite(number) and 0.0 <= number <= high):
        raise Malformed(f"{name} out of range")
    return number


def _headers(value: object) -> list[tuple[str, str]]:
    if not isinstance(value, list):
        raise Malformed("headers is not a list")
    out: list[tuple[str, str]] = []
    for item in value:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], str)
            and isinstance(item[1], str)
            and _TOKEN.fullmatch(item[0])
            and _FIELD_VALUE.fullmatch(item[1])
            and _latin1(item[1])
        ):
            raise Malformed("headers holds something other than header fields")
        out.append((item[0], item[1]))
    return out


def _latin1(value: str) -> bool:
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


def _extra(value: object) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise Malformed("extra is not a map of strings")
    return dict(value)


class Store:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.objects = root / "objects"
        self.block = 4096
        """The filesystem's allocation unit: file sizes are counted rounded up to it."""
        self._lock = threading.Lock()  # publish runs in threads, removals on the loop
        self._directories: dict[Path, int] = {}
        self._directory_bytes = 0

    def prepare(self) -> None:
        self.objects.mkdir(parents=True, exist_ok=True)
        try:
            self.block = max(512, os.statvfs(self.objects).f_frsize or 4096)
        except (OSError, AttributeError):  # pragma: no cover - no statvfs
            self.block = 4096
        for directory in (self.root, self.objects):
            self._measure(directory)

    # ---- disk use -------------------------------------------------------------------------

    def blocks(self, size: int) -> int:
        """`size` bytes of a file as the disk counts them: rounded up to whole blocks."""
        return -(-size // self.block) * self.block

    def cost(self, meta: Meta, data: Path) -> int:
        """What a stored version takes on disk: its data and its record, block-rounded."""
        return self.blocks(meta.length) + self.blocks(len(encode(meta, data.name)))

    def reservation(self, length: int) -> int:
        """What a fill of `length` bytes may take on disk once published (its record's size
        estimated; the version's `cost` replaces it when published)."""
        return self.blocks(length) + _META_ALLOWANCE

    @property
    def directory_bytes(self) -> int:
        """The cache's directories (cache_dir, objects/, the buckets) as the disk counts them."""
        return self._directory_bytes

    def _measure(self, directory: Path) -> None:
        try:
            st = os.lstat(directory)
        except FileNotFoundError:
            size = 0
        else:
            size = max(st.st_blocks * 512, 0)
        with self._lock:
            self._directory_bytes += size - self._directories.pop(directory, 0)
            if size:
                self._directories[directory] = size

    def _remove_bucket_if_empty(self, bucket: Path) -> None:
        try:
            bucket.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                logger.warning("cache: cannot remove %s: %s", bucket, exc)
            return
        with self._lock:
            self._directory_bytes -= self._directories.pop(bucket, 0)

    # ---- one object's files ---------------------------------------------------------------

    def directory_of(self, key: str) -> Path:
        """The bucket directory holding the versions of the object stored under `key`."""
        return self.objects / digest(key)[:2]

    def partial_path(self, key: str) -> Path:
        """A partial file name of its own for one fill of `key` (a new version name)."""
        return self.directory_of(key) / f"{digest(key)}.{secrets.token_hex(8)}{_PARTIAL}"

    @staticmethod
    def data_path(entry: Entry) -> Path:
        """The data file of a stored version."""
        return entry.data

    @staticmethod
    def published_path(partial: Path) -> Path:
        """The data file a fill's partial file becomes when published."""
        return partial.with_suffix(_DATA)

    @staticmethod
    def version_of(partial: Path) -> str:
        """The version name of a fill's partial file (shared by its head and published
        files)."""
        return partial.name.split(".")[1]

    def partial_of(self, key: str, version: str) -> Path:
        """The partial file of the fill of `key` whose version is `version`."""
        return self.directory_of(key) / f"{digest(key)}.{version}{_PARTIAL}"

    # ---- a fill followed by other workers ----------------------------------------------------

    def write_head(self, partial: Path, meta: Meta, length: int | None) -> None:
        """Write the head record of the fill of `partial` (blocking): the record it will
        publish (its `length` the body's, None for an unsized one), atomically, not fsynced
        (it matters only while the fill runs)."""
        record = {
            "length": length,
            "record": encode(meta, self.published_path(partial).name).decode(),
        }
        path = partial.with_suffix(_HEAD)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
        fd = create_exclusive(tmp)
        try:
            try:
                view = memoryview(json.dumps(record, separators=(",", ":")).encode())
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            remove_quietly(tmp)
            raise

    def read_head(self, partial: Path) -> tuple[Meta, int | None] | None:
        """The head record of the fill of `partial` (blocking): its meta and body length
        (None: unsized); None when there is none (yet, or any more) or it does not parse."""
        try:
            raw = partial.with_suffix(_HEAD).read_bytes()
        except OSError:
            return None
        try:
            record = json.loads(raw)
            length = record["length"]
            meta = decode(record["record"].encode(), self.published_path(partial).name)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None
        if length is not None and (type(length) is not int or not 0 <= length <= MAX_LENGTH):
            return None
        return meta, length

    def remove_leftovers(self, key: str, version: str) -> None:
        """Remove what a fill of `key` killed mid-way left (blocking): its partial file and
        head, and its data file if its record was never written."""
        partial = self.partial_of(key, version)
        remove_quietly(partial)
        remove_quietly(partial.with_suffix(_HEAD))
        data = self.published_path(partial)
        if not data.with_suffix(_META).exists():
            remove_quietly(data)

    def remove_head(self, partial: Path) -> None:
        remove_quietly(partial.with_suffix(_HEAD))

    def read_published(self, partial: Path) -> Meta | None:
        """The record the fill of `partial` published, if it did and it is still there
        (blocking)."""
        data = self.published_path(partial)
        try:
            raw = data.with_suffix(_META).read_bytes()
            meta = decode(raw, data.name)
        except (OSError, Malformed):
            return None
        return meta if meta.complete else None

    def open_partial(self, path: Path) -> int:
        """A descriptor to write a fill's partial file, created exclusively (never a file
        someone else opened, never through a symlink); its bucket is made if needed."""
        bucket = path.parent
        for _ in range(5):  # the bucket may be removed (left empty) by a purge meanwhile
            try:
                bucket.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                continue  # removed between mkdir's EEXIST and its is_dir check: again
            try:
                fd = create_exclusive(path)
            except FileNotFoundError:
                continue  # removed between mkdir and the open: again
            self._measure(bucket)
            return fd
        raise FileNotFoundError(errno.ENOENT, "bucket directory keeps vanishing", str(bucket))

    def remove_partial(self, path: Path) -> None:
        """Remove a fill's partial file that was not published (a warning if it stays), and
        its bucket if that leaves it empty: an answer that is not stored (an error,
        `no-store`) leaves nothing on disk."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cache: cannot remove %s: %s", path, exc)
        self._remove_bucket_if_empty(path.parent)

    def publish(self, partial: Path, meta: Meta) -> Path:
        """Publish a filled version (blocking): its partial file gets its data name (never
        replacing a file), then its record is written; returns the data file. A crash in
        between leaves a data file without record, removed at the next start."""
        data = self.published_path(partial)
        publish(partial, data)
        meta.complete = True
        write_atomically(data.with_suffix(_META), encode(meta, data.name))
        self._measure(data.parent)
        return data

    def rewrite_metas(self, metas: list[tuple[Path, Meta]]) -> None:
        """Write several stored versions' records again (every slice of an object refreshed by
        one 304; each given by its data file), blocking: each written beside its record under
        a name of its own (created exclusively), fsynced, renamed over it. The directories are
        not fsynced: a rename lost in a crash leaves the previous record, an older but
        consistent state (the object is revalidated once more). Failures are logged. The
        metas are not changed meanwhile (a refresh replaces an entry's meta)."""
        for data, meta in metas:
            path = data.with_suffix(_META)
            tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.tmp")
            try:
                fd = create_exclusive(tmp)
                try:
                    view = memoryview(encode(meta, data.name))
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except OSError as exc:
                logger.warning("cache: cannot refresh %s: %s", meta.url, exc)
                remove_quietly(tmp)

    def remove(self, entry: Entry) -> None:
        """Remove a stored version's files: unlinked, never truncated (a reader streaming it
        keeps its descriptor); its bucket too if that leaves it empty. Blocking: the cache
        batches removals (`remove_all`) on its threads."""
        self.remove_all([entry.data])

    def remove_all(self, datas: list[Path]) -> None:
        """Remove the files of several stored versions, each given by its data file
        (blocking; see `remove`); a failure is logged."""
        for data in datas:
            try:
                remove_quietly(data.with_suffix(_META))
                remove_quietly(data)
            except OSError as exc:
                logger.warning("cache: cannot remove %s: %s", data.name, exc)
            self._remove_bucket_if_empty(data.parent)

    # ---- startup --------------------------------------------------------------------------

    def load(self) -> list[tuple[Path, Meta, int]]:
        """Every complete stored version as (data file, meta, cost on disk), one per key; the
        rest is removed (a malformed record with a warning line)."""
        found: dict[str, tuple[Path, Meta, int]] = {}
        if not self.objects.is_dir():
            return []
        older = 0
        for bucket in list(self.objects.iterdir()):
            if not _BUCKET.fullmatch(bucket.name) or not _is_directory(bucket):
                remove_tree(bucket)
                continue
            older += self._load_bucket(bucket, found)
            self._remove_bucket_if_empty(bucket)
            self._measure(bucket)
        if older:
            logger.warning("cache: removed %d objects stored in an older layout", older)
        self._measure(self.objects)
        self._measure(self.root)
        return list(found.values())

    def _load_bucket(self, bucket: Path, found: dict[str, tuple[Path, Meta, int]]) -> int:
        """Load one bucket's complete versions into `found`; the number of objects of an
        older layout (a directory per object) removed."""
        older = 0
        names: dict[str, os.stat_result] = {}
        for path in list(bucket.iterdir()):
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            match = _NAME.fullmatch(path.name)
            if stat.S_ISDIR(st.st_mode):
                older += 1
                remove_tree(path)
            elif (
                match is None or match.group(3) in (_PARTIAL, _HEAD) or not stat.S_ISREG(st.st_mode)
            ):
                remove_quietly(path)  # a fill's partial file or head, a temporary file, a stranger
            else:
                names[path.name] = st
        for name in sorted(names):
            if not name.endswith(_META):
                continue
            path = bucket / name
            data = path.with_suffix(_DATA)
            loaded = self._version(path, data, names)
            if loaded is None:
                remove_quietly(path)
                remove_quietly(data)
                continue
            meta, cost = loaded
            kept = found.get(meta.key)
            if kept is None or (kept[1].stored_at, kept[0].name) < (meta.stored_at, data.name):
                if kept is not None:
                    _remove_version(kept[0])
                found[meta.key] = (data, meta, cost)
            else:
                _remove_version(data)
        for name in names:  # data files no record names (their record was never written)
            path = bucket / name
            if name.endswith(_DATA) and not (path.with_suffix(_META)).exists():
                remove_quietly(path)
        return older

    def _version(
        self, path: Path, data: Path, names: dict[str, os.stat_result]
    ) -> tuple[Meta, int] | None:
        """The meta and cost of the version whose record is `path`, if it is complete."""
        try:
            raw = path.read_bytes()
        except OSError as exc:
            logger.warning("cache: discarding %s: unreadable (%s)", path, exc.strerror)
            return None
        try:
            meta = decode(raw, data.name)
            name = digest(meta.key)
            if not path.name.startswith(name + ".") or path.parent.name != name[:2]:
                raise Malformed("its key is another object's")
        except Malformed as exc:
            logger.warning("cache: discarding %s: %s", path, exc)
            return None
        st = names.get(data.name)
        if not meta.complete or st is None or st.st_size != meta.length:
            logger.info("cache: dropping incomplete object %s", path.name)
            return None
        return meta, self.blocks(meta.length) + self.blocks(len(raw))


def _is_directory(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def _remove_version(data: Path) -> None:
    remove_quietly(data.with_suffix(_META))
    remove_quietly(data)


__all__ = ["SCHEMA", "Malformed", "Meta", "Store", "decode", "encode"]
