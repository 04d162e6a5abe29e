"""A fill's request that can be authorized again: one retry after a 401.

Whoever builds a fill's request with a credential that can expire while the fill runs (a
registry's token: a later slice of a long answer, a resume of a cut body) marks the request
with `REAUTHORIZE`: how to get the request again with a new credential. A 401 to such a
request is then answered by that one retry; never more per request sent, and a failure to
get a new credential leaves the 401 standing (answered as any 401 is).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import httpx

from relay.config import Route
from relay.errors import UpstreamError
from relay.net.upstream import Upstream

logger = logging.getLogger(__name__)

#: Request extension: a `Reauthorize` (see the module).
REAUTHORIZE = "relay.reauthorize"
Reauthorize = Callable[[httpx.Request, httpx.Response], Awaitable["httpx.Request | None"]]
"""(the request sent, its 401) -> the request to retry with a new credential, or None when
there is none to be had; raises UpstreamError when getting one failed."""


async def open_authorized(
    upstream: Upstream, request: httpx.Request, route: Route, *, background: bool
) -> httpx.Response:
    """`Upstream.open`, then, for a marked request answered 401, the one retry (see the
    module). The caller owns (and closes) the response returned; a 401 replaced is closed
    here."""
    response = await upstream.open(request, route, background=background)
    reauthorize: Reauthorize | None = request.extensions.get(REAUTHORIZE)
    if response.status_code != 401 or reauthorize is None:
        return response
    try:
        retry = await reauthorize(request, response)
    except UpstreamError as exc:
        logger.warning("cache fill: cannot authorize again after a 401: %s", exc.reason)
        return response
    except BaseException:
        await asyncio.shield(response.aclose())
        raise
    if retry is None:
        return response
    await asyncio.shield(response.aclose())
    logger.info("cache fill: 401 with an expired credential, retried once with a new one")
    return await upstream.open(retry, route, background=background)


def carry_over(failed: httpx.Request, request: httpx.Request) -> None:
    """`request` continues `failed` (a resume): it may be authorized again as it could."""
    if REAUTHORIZE in failed.extensions:
        request.extensions[REAUTHORIZE] = failed.extensions[REAUTHORIZE]


__all__ = ["REAUTHORIZE", "Reauthorize", "carry_over", "open_authorized"]
