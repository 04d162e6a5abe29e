"""Downloads to disk and serving stored files (stub: implemented by the to-disk change)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.routing import BaseRoute

from relay.config import Config
from relay.routing import RouteTable
from relay.upstream import Upstream


def routes() -> list[BaseRoute]:
    """Starlette routes for /downloads and /files, mounted before the relay catch-all."""
    return []


@contextlib.asynccontextmanager
async def open_downloads(
    config: Config, upstream: Upstream, route_table: RouteTable
) -> AsyncIterator[object | None]:
    """Open the download manager for the app's lifetime (None when disk features are off)."""
    yield None
