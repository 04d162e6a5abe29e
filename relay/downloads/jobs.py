"""The download manager: accepts jobs, runs at most `max_downloads` at once, survives restarts.

Each job is one asyncio task that waits for a slot (state `queued`), then fetches into its
partial file and publishes it (state `running`). The job store holds every job; the manager
holds the active ones in memory (their progress changes by the chunk).

Start: jobs left queued or running by the previous process are queued again and resume from
their partial files (re-hashed first); partial files without a job are removed. A job that was
publishing when the process died (final file present, partial gone) is checked and adopted.

Bounds: at most `downloads_max_jobs` jobs are stored and `downloads_max_bytes` bytes of files
(published, and partial or announced) kept; past either a new job is refused with 507, and a
running job whose announced length would pass the byte quota fails, as does (found by a check
every second) one of unannounced length whose body passes it. Finished jobs older than
`downloads_retention` are deleted with their files by a sweep that runs in the background.

Stop (the lifespan ending): every task is cancelled; each closes its upstream response and
its file on the way out. States stay `queued`/`running` in the store and partial files stay on
disk, so the next start resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import NamedTuple

from relay import disk
from relay.config import Config
from relay.downloads.errors import JobFailed, as_job_failure
from relay.downloads.fetch import Fetcher
from relay.downloads.intake import Order
from relay.downloads.model import Job, JobState
from relay.downloads.names import DataDir, new_job_id
from relay.downloads.shared import PROGRESS_EVERY, RUNNER_LOCK, RUNNER_POLL, SUBMIT_LOCK, FileLock
from relay.downloads.store import JobStore, StoreError
from relay.errors import ClientError, Conflict, InsufficientStorage, NotFound, Unavailable
from relay.net.routing import RouteTable, Target
from relay.net.upstream import Upstream
from relay.transfer import PartialFile

logger = logging.getLogger(__name__)

MAX_ACTIVE = 1000
"""Jobs queued or running at once; beyond this POST /downloads answers 503."""
WATCH_INTERVAL = 1.0
"""Seconds between the background retention sweep and byte-quota checks (at most)."""
SWEEP_BATCH = 500
"""Expired jobs deleted per sweep step."""


class JobCounts(NamedTuple):
    queued: int
    """Jobs waiting for one of the max_downloads slots."""
    running: int
    """Jobs holding a slot: fetching, verifying or publishing."""


class _Withdrawn(Exception):
    """The job's record was ended by another worker (cancelled): stop, record nothing."""


class DownloadManager:
    """With several workers (`shared`), see relay/downloads/shared.py: every worker answers
    from the store, one (the runner) runs the jobs."""

    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        route_table: RouteTable,
        data: DataDir,
        *,
        shared: bool = False,
    ) -> None:
        self.route_table = route_table
        self._upstream = upstream
        self._resume_attempts = config.resume_attempts
        self._data = data
        self._store = JobStore(data.store_path)
        self._slots = asyncio.Semaphore(config.max_downloads)
        self._active: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._submitting = asyncio.Lock()
        self._closing = False
        self._max_jobs = config.downloads_max_jobs
        self._max_bytes = config.downloads_max_bytes
        self._retention = config.downloads_retention
        self._sweeper: asyncio.Task[None] | None = None
        self._shared = shared
        self._runner: FileLock | None = None
        self._submit_lock: FileLock | None = None
        self._coordinator: asyncio.Task[None] | None = None

    @property
    def running_jobs(self) -> bool:
        """Whether this process runs the jobs (always, as one process; the runner, shared)."""
        return not self._shared or (self._runner is not None and self._runner.held)

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._data.create)
        await self._store.open()
        if not self._shared:
            await self._recover()
            return
        self._runner = FileLock(self._data.root / RUNNER_LOCK)
        self._submit_lock = FileLock(self._data.root / SUBMIT_LOCK)
        self._coordinator = asyncio.create_task(self._coordinate(), name="service: downloads")

    async def _recover(self) -> None:
        """Take over the jobs left queued or running (the last run, or a dead runner)."""
        unfinished = await self._store.unfinished()
        orphans = await asyncio.to_thread(self._data.orphan_partials, {j.id for j in unfinished})
        for orphan in orphans:
            logger.info("removing partial file without a job: %s", orphan.name)
            await asyncio.to_thread(disk.remove_quietly, orphan)
        for job in unfinished:
            on_disk = await asyncio.to_thread(_size_of, self._data.partial(job.id))
            if on_disk is None and await self._adopt(job):
                continue
            job.state = JobState.QUEUED
            job.bytes_done = on_disk or 0
            job.touch()
            await self._store.save(job)
            self._schedule(job)
        if unfinished:
            logger.info("resuming %d download(s) left by the previous run", len(unfinished))
        if self._retention or self._max_bytes:
            self._sweeper = asyncio.create_task(self._watch(), name="service: downloads quotas")

    async def close(self) -> None:
        self._closing = True
        tasks = list(self._tasks.values())
        for service in (self._sweeper, self._coordinator):
            if service is not None:
                tasks.append(service)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            await self._store.close()
        finally:
            for lock in (self._runner, self._submit_lock):
                if lock is not None:
                    lock.close()

    async def _coordinate(self) -> None:
        """Shared: become the runner when the lock is free; as the runner, pick up jobs other
        workers queued, stop those they cancelled and save progress for them to answer with."""
        assert self._runner is not None
        saved = 0.0
        while True:
            try:
                if not self._runner.held and self._runner.try_acquire():
                    logger.info("this worker now runs the downloads to disk")
                    await self._recover()
                elif self._runner.held:
                    await self._pick_up()
                    now = time.monotonic()
                    if now - saved >= PROGRESS_EVERY:
                        saved = now
                        for job in [j for j in self._active.values() if j.state.active]:
                            if not await self._store.save(job):
                                await self._withdrawn(job)
            except StoreError as exc:
                logger.warning("downloads: the job store failed: %s", exc.reason)
            await asyncio.sleep(RUNNER_POLL)

    async def _pick_up(self) -> None:
        stored = {job.id: job for job in await self._store.active()}
        for job_id, job in stored.items():
            if job_id not in self._active and job.state == JobState.QUEUED:
                self._schedule(job)
        for job in list(self._active.values()):
            if job.id not in stored and job.state.active and job.id in self._tasks:
                await self._withdrawn(job)

    async def _withdrawn(self, job: Job) -> None:
        """Stop a job another worker ended (cancelled), leaving its record as that worker
        wrote it."""
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        await asyncio.to_thread(disk.remove_quietly, self._data.partial(job.id))
        logger.info("download %s: ended by another worker, stopped", job.id)

    # ---- requests ---------------------------------------------------------------------------

    async def submit(self, order: Order) -> Job:
        """The job for `order`: an existing one for the same file, or a new queued one."""
        async with self._submitting:
            lock = self._submit_lock
            if lock is None:
                return await self._submit(order)
            acquiring = asyncio.ensure_future(asyncio.to_thread(lock.acquire))
            try:
                await asyncio.shield(acquiring)
            except asyncio.CancelledError:
                # The thread may still get the lock: give it back then, or no worker could
                # ever submit again.
                acquiring.add_done_callback(lambda _: lock.release())
                raise
            try:
                return await self._submit(order)
            finally:
                lock.release()

    async def _submit(self, order: Order) -> Job:
        if self._closing:
            raise Unavailable("relay is shutting down; retry shortly")
        job = Job(
            id=new_job_id(),
            path=order.path,
            url=order.url,
            name=order.name,
            expected_sha256=order.sha256,
            expected_size=order.size,
        )
        existing = await self._existing(job)
        if existing is not None:
            return existing
        if len(await self._all_active()) >= MAX_ACTIVE:
            raise Unavailable("too many downloads queued; retry later")
        await self._check_quotas(order.size)
        await self._store.save(job)
        if self.running_jobs:
            self._schedule(job)  # else the runner picks it up from the store
        logger.info("download %s queued: %s -> %s", job.id, job.url.split("?")[0], job.name)
        return job

    async def _existing(self, job: Job) -> Job | None:
        """A job to share instead of `job`; None when `job` may go ahead under its name.

        Shared: an active job for the same key; a completed one whose file is still there;
        the job that published a file under this name with the sha256 `job` expects. Any
        other holder of the name (an active job, a different file) is a conflict.
        """
        active = await self._all_active()
        same = next((j for j in active if j.key == job.key), None)
        if same is not None:
            return same
        done = await self._store.completed_with_key(job.key)
        done_file = self._data.file(done.name) if done is not None else None
        if done_file is not None and await asyncio.to_thread(_size_of, done_file) is not None:
            return done
        writer = next((j for j in active if j.name == job.name), None)
        if writer is not None:
            raise Conflict(f"download {writer.id} is writing this name", field="name")
        if not await asyncio.to_thread(os.path.lexists, self._data.file(job.name)):
            return None
        holder = await self._store.completed_with_name(job.name)
        if holder is not None and holder.sha256 and job.expected_sha256 == holder.sha256:
            return holder
        hint = f"; DELETE /downloads/{holder.id} frees it" if holder is not None else ""
        raise Conflict(f"a different file with this name exists{hint}", field="name")

    async def get(self, job_id: str) -> Job:
        job = self._active.get(job_id) or await self._store.get(job_id)
        if job is None:
            raise NotFound("no such download")
        return job

    async def latest(self, limit: int) -> list[Job]:
        """Newest first; active jobs with their live progress."""
        return [self._active.get(j.id, j) for j in await self._store.latest(limit)]

    async def remove(self, job_id: str) -> Job | None:
        """Cancel an active job (returning it) or forget a finished one and its file (None)."""
        job = self._active.get(job_id)
        if job is not None:
            await self._stop(job, JobState.CANCELLED, "cancelled by request")
            return job
        stored = await self._store.get(job_id)
        if stored is None:
            raise NotFound("no such download")
        if stored.state.active:
            # Another worker runs it (shared): end its record; that worker stops it.
            reason = "cancelled by request"
            if await self._store.withdraw(job_id, JobState.CANCELLED, reason, time.time()):
                stored.state, stored.error = JobState.CANCELLED, reason
                logger.info("download %s cancelled (run by another worker)", job_id)
                return stored
            return await self.remove(job_id)  # it finished meanwhile
        if stored.state == JobState.COMPLETED:
            holder = await self._store.completed_with_name(stored.name)
            if holder is not None and holder.id == stored.id:
                await asyncio.to_thread(disk.remove_quietly, self._data.file(stored.name))
        await self._store.delete(job_id)
        logger.info("download %s deleted", job_id)
        return None

    async def _stop(self, job: Job, state: JobState, reason: str) -> None:
        """End an active job's task and its files, recording it as `state` with `reason`."""
        task = self._tasks.get(job.id)
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        if job.state.active:
            await asyncio.to_thread(disk.remove_quietly, self._data.partial(job.id))
            if await self._store.completed_with_name(job.name) is None:
                # Stopped between the rename and its record: the name was reserved
                # for this job, so a file under it is this job's.
                await asyncio.to_thread(disk.remove_quietly, self._data.file(job.name))
            await self._finish(job, state, reason)

    def counts(self) -> JobCounts:
        """Active jobs by state, for the metrics."""
        states = [job.state for job in self._active.values()]
        return JobCounts(
            queued=states.count(JobState.QUEUED), running=states.count(JobState.RUNNING)
        )

    async def published(self, name: str) -> tuple[Path, Job] | None:
        """The file published under `name` and the job that verified it."""
        job = await self._store.completed_with_name(name)
        return (self._data.file(name), job) if job is not None else None

    # ---- running ----------------------------------------------------------------------------

    def _schedule(self, job: Job) -> None:
        self._active[job.id] = job
        task = asyncio.create_task(self._run(job), name=f"download {job.id}")
        self._tasks[job.id] = task

        def forget(done: asyncio.Task[None]) -> None:
            self._tasks.pop(job.id, None)
            self._active.pop(job.id, None)
            if not done.cancelled() and done.exception() is not None:
                logger.error("download %s ended abnormally", job.id, exc_info=done.exception())

        task.add_done_callback(forget)

    async def _run(self, job: Job) -> None:
        async with self._slots:
            job.state = JobState.RUNNING
            job.rate.reset()
            job.touch()
            partial_path = self._data.partial(job.id)
            try:
                if not await self._store.save(job):
                    raise _Withdrawn
                digest = await self._download(job, partial_path)
            except _Withdrawn:
                await asyncio.to_thread(disk.remove_quietly, partial_path)
                logger.info("download %s: ended by another worker, stopped", job.id)
                return
            except (JobFailed, StoreError) as exc:
                reason = exc.reason
                logger.warning("download %s failed: %s", job.id, reason)
            except Exception as exc:
                reason = f"internal error ({type(exc).__name__})"
                logger.exception("download %s failed unexpectedly", job.id)
            else:
                job.sha256 = digest
                logger.info("download %s completed: %s (%s)", job.id, job.name, digest)
                await self._finish(job, JobState.COMPLETED)
                return
            await asyncio.to_thread(disk.remove_quietly, partial_path)
            await self._finish(job, JobState.FAILED, reason)

    async def _download(self, job: Job, partial_path: Path) -> str:
        target = self._resolve(job)
        with as_job_failure():
            partial = await PartialFile.open(partial_path)
        try:
            job.bytes_done = partial.size
            fetcher = Fetcher(
                self._upstream,
                job,
                target,
                partial,
                resume_attempts=self._resume_attempts,
                checkpoint=lambda: self._checkpoint(job),
            )
            await fetcher.run()
            with as_job_failure():
                return await partial.publish(
                    self._data.file(job.name),
                    expected_size=job.expected_size if job.total is None else job.total,
                    expected_sha256=job.expected_sha256,
                    upstream_sha256=job.upstream_sha256,
                )
        finally:
            await partial.close()

    def _resolve(self, job: Job) -> Target:
        """The job's upstream URL under the routes configured now."""
        raw_path, _, query = job.path.partition("?")
        try:
            target = self.route_table.resolve(raw_path.encode("ascii"), query.encode("ascii"))
        except ClientError as exc:
            raise JobFailed(f"path is no longer served: {exc.reason}") from None
        job.url = target.url
        return target

    # ---- quotas and retention ---------------------------------------------------------------

    async def _check_quotas(self, size: int | None) -> None:
        """Refuse a new job with 507 when the store is full (after expired jobs are swept)."""
        for sweep_first in (False, True):
            if sweep_first:
                if not self._retention:
                    break
                await self.sweep()
            jobs = await self._store.count()
            used = await self._bytes_used() if self._max_bytes else 0
            if jobs < self._max_jobs and not self._over_bytes(used, size):
                return
        if jobs >= self._max_jobs:
            raise InsufficientStorage(
                f"{jobs} download jobs are stored, the most downloads_max_jobs allows; "
                "DELETE finished ones"
            )
        raise InsufficientStorage(
            f"downloads use {used} bytes of downloads_max_bytes ({self._max_bytes})"
            + (f"; {size} more do not fit" if size else "")
            + "; DELETE finished ones"
        )

    def _over_bytes(self, used: int, size: int | None) -> bool:
        if not self._max_bytes:
            return False
        return used >= self._max_bytes or used + (size or 0) > self._max_bytes

    async def _all_active(self) -> list[Job]:
        """The active jobs: this process's (live progress) and, shared, every worker's."""
        if not self._shared:
            return list(self._active.values())
        return [self._active.get(job.id, job) for job in await self._store.active()]

    async def _bytes_used(self) -> int:
        """Published files, plus each active job's partial file or announced length."""
        reserved = sum(
            max(job.bytes_done, job.total or job.expected_size or 0)
            for job in await self._all_active()
        )
        return await self._store.completed_bytes() + reserved

    async def _checkpoint(self, job: Job) -> None:
        """Record the job's progress; fail it if its announced length passes the byte quota."""
        if not await self._store.save(job):
            raise _Withdrawn
        if self._max_bytes and job.total is not None:
            used = await self._bytes_used()
            if used > self._max_bytes:
                raise JobFailed(
                    f"insufficient storage: {job.total} bytes would pass downloads_max_bytes "
                    f"({self._max_bytes})"
                )

    async def sweep(self) -> int:
        """Delete finished jobs older than downloads_retention, with their files."""
        if not self._retention:
            return 0
        removed = 0
        while True:
            cutoff = time.time() - self._retention
            expired = await self._store.finished_before(cutoff, SWEEP_BATCH)
            batch = 0
            for job in expired:
                if job.id in self._active:
                    continue  # finished a moment ago; its task is still ending
                with contextlib.suppress(NotFound):
                    await self.remove(job.id)
                    batch += 1
            removed += batch
            if len(expired) < SWEEP_BATCH or not batch:
                break
        if removed:
            logger.info("retention: deleted %d finished download job(s)", removed)
        return removed

    async def _enforce_bytes(self) -> None:
        """Fail running jobs of unannounced length, newest first, while over the byte quota."""
        if not self._max_bytes:
            return
        used = await self._bytes_used()
        newest_first = sorted(self._active.values(), key=lambda j: j.created, reverse=True)
        for job in newest_first:
            if used <= self._max_bytes:
                return
            if job.state != JobState.RUNNING or job.total is not None:
                continue  # an announced length was checked when it was announced
            used -= job.bytes_done
            logger.warning("download %s: over downloads_max_bytes, stopping it", job.id)
            await self._stop(
                job,
                JobState.FAILED,
                f"insufficient storage: the body passed downloads_max_bytes ({self._max_bytes})",
            )

    async def _watch(self) -> None:
        """Retention and the byte quota, checked in the background (at most every second)."""
        interval = WATCH_INTERVAL
        if self._retention:
            interval = max(min(self._retention / 4, WATCH_INTERVAL), 0.05)
        while True:
            try:
                await self.sweep()
                await self._enforce_bytes()
            except StoreError as exc:
                logger.warning("downloads quota check failed: %s", exc.reason)
            await asyncio.sleep(interval)

    async def _finish(self, job: Job, state: JobState, error: str | None = None) -> None:
        job.state = state
        job.error = error
        if state == JobState.COMPLETED:
            job.bytes_done = job.total = job.total if job.total is not None else job.bytes_done
        job.touch()
        try:
            recorded = await self._store.save(job)
        except StoreError as exc:
            # The store keeps the job's previous state: the next start runs it again.
            logger.error("download %s: could not record %s: %s", job.id, state, exc.reason)
            return
        if not recorded and state == JobState.COMPLETED:
            # Cancelled through another worker as it completed: the cancel stands.
            await asyncio.to_thread(disk.remove_quietly, self._data.file(job.name))

    async def _adopt(self, job: Job) -> bool:
        """Complete a job whose file was published just before the last process stopped."""
        target = self._data.file(job.name)
        if job.state != JobState.RUNNING or await asyncio.to_thread(_size_of, target) is None:
            return False
        if await self._store.completed_with_name(job.name) is not None:
            return False
        on_disk = await asyncio.to_thread(disk.hash_file, target)
        digest, size = on_disk.hexdigest, on_disk.size
        digests = {job.expected_sha256, job.upstream_sha256} - {None}
        sizes = {job.total, job.expected_size} - {None}
        if digests - {digest} or sizes - {size}:
            logger.warning("download %s: %s exists but does not match", job.id, target.name)
            await self._finish(job, JobState.FAILED, "a different file with this name exists")
            return True
        job.sha256, job.total, job.bytes_done = digest, size, size
        logger.info("download %s: adopting %s, published before the last stop", job.id, job.name)
        await self._finish(job, JobState.COMPLETED)
        return True


def _size_of(path: Path) -> int | None:
    """The size of the file at `path`, or None when there is none."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return None
