"""Downloads to disk (`POST /downloads`) and serving what they stored (`GET /files/{name}`).

    api.py         the /downloads endpoints
    files.py       /files/{name}: validators, single ranges, FileResponse
    intake.py      a POST body -> Order (path or url mapped through the route table)
    jobs.py        DownloadManager: queue, concurrency limit, restart recovery, cancel
    fetch.py       a job's side of its transfer (relay.transfer: the engine shared with
                   `relay fetch` that fetches, resumes, verifies and publishes the file)
    store.py       jobs in SQLite (WAL) on one thread
    model.py       Job and JobState; rate.py the smoothed rate
    names.py       ids, file names, the data directory layout; errors.py JobFailed

The /downloads API needs the admin credential (`admin_token` in `admin_header`) unless
`downloads_open` is set; the store is bounded by `downloads_max_jobs`, `downloads_max_bytes`
and `downloads_retention`.

With `data_dir` empty the feature is off: `open_downloads` yields None and no endpoint is
mounted, so /downloads and /files belong to the routes like any other path.

One relay per data directory: `open_downloads` (or, with several workers, the supervisor)
holds an exclusive lock on `data_dir/relay.lock` for the server's lifetime. Two relays on one
directory (a volume shared by two pods) would take over each other's jobs and write into each
other's files; the second one refuses to start instead.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

from starlette.routing import BaseRoute, Route

from relay.config import Config
from relay.credentials import AdminAuth
from relay.downloads.api import admin_only, download, downloads
from relay.downloads.files import serve_file
from relay.downloads.jobs import DownloadManager
from relay.downloads.names import DataDir
from relay.downloads.store import StoreError
from relay.errors import StartupError
from relay.net.routing import RouteTable
from relay.net.upstream import Upstream

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no lock on the data directory
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = "relay.lock"


def routes(config: Config) -> list[BaseRoute]:
    """Starlette routes for /downloads and /files, mounted before the relay catch-all.

    None without a data_dir: then those paths belong to the routes like any other.
    """
    if not config.data_dir:
        return []
    # The whole API needs the admin credential: listing and job details name other clients'
    # URLs. /files stays under client authentication only, as relayed paths are.
    admin = (
        None
        if config.downloads_open
        else AdminAuth(token=config.admin_token, header=config.admin_header)
    )
    return [
        Route("/downloads", admin_only(downloads, admin), methods=["GET", "POST"]),
        Route("/downloads/{job_id:path}", admin_only(download, admin), methods=["GET", "DELETE"]),
        Route("/files/{name:path}", serve_file, methods=["GET", "HEAD"]),
    ]


@contextlib.asynccontextmanager
async def open_downloads(
    config: Config, upstream: Upstream, route_table: RouteTable, *, shared: bool = False
) -> AsyncIterator[DownloadManager | None]:
    """Open the download manager for the app's lifetime (None when disk features are off).

    Raises StartupError when the data directory is held by another process or unusable.
    `shared`: one of several workers (relay/downloads/shared.py); the supervisor holds the
    data directory's lock for them all.
    """
    if not config.data_dir:
        yield None
        return
    data = DataDir(config.data_dir)
    # Taken on the loop thread (a few microseconds): a thread the lifespan's cancellation
    # could abandon would leave the lock held by nobody's code.
    lock = None if shared else DataDirLock.acquire(data.root)
    try:
        manager = DownloadManager(config, upstream, route_table, data, shared=shared)
        try:
            await manager.start()
        except BaseException as exc:
            await manager.close()
            if isinstance(exc, StoreError):
                raise StartupError(
                    f"job store {data.store_path}: {exc.reason}; if it is damaged, move it "
                    "aside (relay then starts with no jobs)"
                ) from exc
            if isinstance(exc, OSError):
                raise StartupError(f"cannot use data_dir {data.root}: {_describe(exc)}") from exc
            raise
        try:
            yield manager
        finally:
            await manager.close()
    finally:
        if lock is not None:
            lock.release()


class DataDirLock:
    """An exclusive `flock` on `data_dir/relay.lock`, held until released (or the process
    ends: the kernel drops it with the file descriptor, so a crash never leaves it stale)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, root: Path) -> DataDirLock:
        path = root / LOCK_NAME
        try:
            root.mkdir(mode=0o750, parents=True, exist_ok=True)
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
            fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o640)
        except OSError as exc:
            raise StartupError(f"cannot use data_dir {root}: {_describe(exc)}") from exc
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise StartupError(
                f"data_dir {root} is in use by another relay process{holder}; give each "
                "relay its own data_dir (is one volume mounted into two pods?)"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"cannot lock {path}: {_describe(exc)}") from exc
        return cls(fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the lock; the file stays (removing it would race a starter)


def _holder(fd: int) -> str:
    """ " (pid N)" from the lock file's content, when it names one."""
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (pid {text})" if text.isdigit() else ""


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


__all__ = ["DataDirLock", "DownloadManager", "open_downloads", "routes"]
