"""Downloads to disk (`POST /downloads`) and serving what they stored (`GET /files/{name}`).

    api.py         the /downloads endpoints
    files.py       /files/{name}: validators, single ranges, FileResponse
    intake.py      a POST body -> Order (path or url mapped through the route table)
    jobs.py        DownloadManager: queue, concurrency limit, restart recovery, cancel
    fetch.py       one job's upstream attempts: Range + If-Range resume, backoff
    writer.py      the partial file: exclusive create, hash while writing, verified publish
    store.py       jobs in SQLite (WAL) on one thread
    model.py       Job and its states; rate.py the smoothed rate
    digests.py     the upstream's announced sha256 (relay/ranges.py, relay/validators.py:
                   the HTTP range and validator helpers shared with streams and `relay fetch`)
    names.py       ids, file names, the data directory layout; errors.py the error tree

The /downloads API needs the admin credential (`admin_token` in `admin_header`) unless
`downloads_open` is set; the store is bounded by `downloads_max_jobs`, `downloads_max_bytes`
and `downloads_retention`.

With `data_dir` empty the feature is off: `open_downloads` yields None and no endpoint is
mounted, so /downloads and /files belong to the routes like any other path.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.routing import BaseRoute, Route

from relay.auth import AdminAuth
from relay.config import Config
from relay.downloads.api import admin_only, download, downloads
from relay.downloads.files import serve_file
from relay.downloads.jobs import DownloadManager
from relay.downloads.names import DataDir
from relay.routing import RouteTable
from relay.upstream import Upstream


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
    config: Config, upstream: Upstream, route_table: RouteTable
) -> AsyncIterator[DownloadManager | None]:
    """Open the download manager for the app's lifetime (None when disk features are off)."""
    if not config.data_dir:
        yield None
        return
    manager = DownloadManager(config, upstream, route_table, DataDir(config.data_dir))
    try:
        await manager.start()
    except BaseException:
        await manager.close()
        raise
    try:
        yield manager
    finally:
        await manager.close()


__all__ = ["DownloadManager", "open_downloads", "routes"]
