"""Jobs persisted in SQLite (`data_dir/jobs.sqlite3`, WAL), so they survive a restart.

All SQLite work runs on one dedicated thread: the event loop never waits on the disk, the
connection is only ever used by the thread that opened it, and statements run in the order
they were submitted (a state change can never be overtaken by an older progress update).
Rows are snapshots taken on the event loop thread.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from relay.downloads.model import Job, JobState
from relay.errors import StartupError, Unavailable

T = TypeVar("T")

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 5.0
"""Seconds a statement waits for a lock another connection holds before failing."""
_COLUMNS = (
    "id",
    "key",
    "path",
    "url",
    "name",
    "expected_sha256",
    "expected_size",
    "state",
    "bytes_done",
    "total",
    "attempts",
    "error",
    "sha256",
    "validator",
    "byte_ranges",
    "upstream_sha256",
    "created",
    "updated",
)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    key TEXT NOT NULL,
    path TEXT NOT NULL,
    url TEXT NOT NULL,
    name TEXT NOT NULL,
    expected_sha256 TEXT,
    expected_size INTEGER,
    state TEXT NOT NULL,
    bytes_done INTEGER NOT NULL,
    total INTEGER,
    attempts INTEGER NOT NULL,
    error TEXT,
    sha256 TEXT,
    validator TEXT,
    byte_ranges INTEGER NOT NULL,
    upstream_sha256 TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
CREATE INDEX IF NOT EXISTS jobs_key ON jobs (key, state);
CREATE INDEX IF NOT EXISTS jobs_name ON jobs (name, state);
"""
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM jobs"  # noqa: S608 - constant column names
_ACTIVE_STATES = ("queued", "running")
# A job's record is written only while it is active: once finished (or cancelled by another
# worker of the same server) a late progress or state save from its runner changes nothing,
# and the runner learns the job was withdrawn (`save` returns False).
_UPSERT = (
    f"INSERT INTO jobs ({', '.join(_COLUMNS)}) "  # noqa: S608 - constant names
    f"VALUES ({', '.join('?' * len(_COLUMNS))}) ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS if c != "id")
    + " WHERE jobs.state IN ('queued', 'running')"
)


class StoreError(Unavailable):
    """SQLite failed (disk full, I/O error, a locked or corrupt file): answered with 503."""


class JobStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-jobs-db")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        """Open (or create) the store; StartupError naming the file when it cannot be used."""
        loop = asyncio.get_running_loop()
        try:
            self._db = await loop.run_in_executor(self._executor, self._connect)
        except sqlite3.Error as exc:
            raise StartupError(_unusable(self._path, exc)) from exc

    async def close(self) -> None:
        try:
            if self._db is not None:
                await self._run(sqlite3.Connection.close)
                self._db = None
        finally:
            self._executor.shutdown(wait=False)

    async def save(self, job: Job) -> bool:
        """Record `job`; False (nothing written) when its record is no longer active."""
        row = _row(job)
        return bool(await self._run(lambda db: db.execute(_UPSERT, row).rowcount))

    async def withdraw(self, job_id: str, state: JobState, error: str, updated: float) -> bool:
        """End an active job's record as `state` (another worker runs it); False if it was
        not active."""
        return bool(
            await self._run(
                lambda db: (
                    db.execute(
                        "UPDATE jobs SET state = ?, error = ?, updated = ? "
                        "WHERE id = ? AND state IN (?, ?)",
                        (state.value, error, updated, job_id, *_ACTIVE_STATES),
                    ).rowcount
                )
            )
        )

    async def active(self) -> list[Job]:
        """Jobs queued or running (in any worker), oldest first."""
        return await self.unfinished()

    async def delete(self, job_id: str) -> None:
        await self._run(lambda db: db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)))

    async def get(self, job_id: str) -> Job | None:
        rows = await self._select("WHERE id = ?", job_id)
        return rows[0] if rows else None

    async def unfinished(self) -> list[Job]:
        """Jobs that were queued or running when relay last stopped, oldest first."""
        return await self._select(
            "WHERE state IN (?, ?) ORDER BY created", JobState.QUEUED.value, JobState.RUNNING.value
        )

    async def latest(self, limit: int) -> list[Job]:
        return await self._select("ORDER BY created DESC LIMIT ?", limit)

    # ---- quotas and retention -------------------------------------------------------------

    async def count(self) -> int:
        """Jobs stored, in any state."""
        return int(
            await self._run(lambda db: db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0])
        )

    async def completed_bytes(self) -> int:
        """Bytes of the files completed jobs published."""
        row = await self._run(
            lambda db: db.execute(
                "SELECT COALESCE(SUM(total), 0) FROM jobs WHERE state = ?",
                (JobState.COMPLETED.value,),
            ).fetchone()
        )
        return int(row[0])

    async def finished_before(self, updated: float, limit: int) -> list[Job]:
        """Finished jobs (completed, failed, cancelled) last changed before `updated`."""
        return await self._select(
            "WHERE state NOT IN (?, ?) AND updated < ? ORDER BY updated LIMIT ?",
            JobState.QUEUED.value,
            JobState.RUNNING.value,
            updated,
            limit,
        )

    async def completed_with_key(self, key: str) -> Job | None:
        rows = await self._select(
            "WHERE key = ? AND state = ? ORDER BY created DESC LIMIT 1",
            key,
            JobState.COMPLETED.value,
        )
        return rows[0] if rows else None

    async def completed_with_name(self, name: str) -> Job | None:
        rows = await self._select(
            "WHERE name = ? AND state = ? ORDER BY created DESC LIMIT 1",
            name,
            JobState.COMPLETED.value,
        )
        return rows[0] if rows else None

    async def _select(self, where: str, *params: Any) -> list[Job]:
        rows = await self._run(lambda db: db.execute(f"{_SELECT} {where}", params).fetchall())
        return [_job(row) for row in rows]

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        if db is None:
            raise RuntimeError("job store is not open")
        # Autocommit: every statement relay issues is a transaction of its own.
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, db)
        except sqlite3.Error as exc:
            raise StoreError(f"job store failed: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self._path, isolation_level=None, timeout=BUSY_TIMEOUT)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # WAL + NORMAL: a commit survives a process crash; a power loss may lose the last
            # few commits, which only costs a re-hash of a partial file on the next start.
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT * 1000)}")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StartupError(
                    f"job store {self._path} was written by a newer relay (schema {version}); "
                    f"this one understands schema {SCHEMA_VERSION}: run the newer relay, or "
                    "move the file aside (relay then starts with no jobs)"
                )
            db.executescript(_SCHEMA)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        except BaseException:
            db.close()
            raise
        return db


def _unusable(path: Path, exc: sqlite3.Error) -> str:
    """One line naming the job store, what is wrong with it and what to do."""
    cause = str(exc) or type(exc).__name__
    if isinstance(exc, sqlite3.OperationalError) and "locked" in cause:
        return (
            f"job store {path} is locked ({cause}): another process is using it; stop that "
            "process (each relay needs its own data_dir)"
        )
    return (
        f"job store {path} cannot be read ({cause}); if it is damaged, move it aside "
        "(relay then starts with no jobs) or restore it from a backup"
    )


def _row(job: Job) -> tuple[Any, ...]:
    return (
        job.id,
        job.key,
        job.path,
        job.url,
        job.name,
        job.expected_sha256,
        job.expected_size,
        job.state.value,
        job.bytes_done,
        job.total,
        job.attempts,
        job.error,
        job.sha256,
        job.validator,
        int(job.byte_ranges),
        job.upstream_sha256,
        job.created,
        job.updated,
    )


def _job(row: tuple[Any, ...]) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    values.pop("key")
    values["state"] = JobState(values["state"])
    values["byte_ranges"] = bool(values["byte_ranges"])
    return Job(**values)
