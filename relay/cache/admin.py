"""The cache's admin endpoints, behind the admin credential (closed without admin_token):

- `DELETE /cache/<relayed path>[?query]`: drop that object (every encoding variant); on an
  `hf` route, `DELETE /cache/<route>/sha256/<hex>` drops the Hub file stored under that digest;
- `POST /cache/purge` with `{"prefix": "/route/some/dir/"}`: drop every object under it;
- a purge covers what is being filled: such a fill finishes serving its clients but stores
  nothing (counted in `purged`), so the next request fetches again;
- `POST /cache/scrub`: start verifying every stored object with a known digest against its
  bytes, in the background at `cache_verify_rate` (202; 409 with the run under way if one
  is); `GET /cache/scrub`: the run under way or the last one (objects, checked, bytes hashed,
  mismatches, running). Mismatches are dropped and counted (`relay.cache.integrity`);
- `POST /cache/prefetch` with `{"path": "/route/file?query"}`: start a fill with no client
  (it runs to completion, coalesced with any client fill of the same object, unless a client's
  request needs its upstream connection); 202; 503 with Retry-After when fills without a
  client are at their limit (`cache_background_fills`, `cache_background_share`). A Hub file
  (`<hf route>/<repo>/resolve/<rev>/<file>`) is asked of the Hub first and stored under its
  sha256 (the prefetch carries no client credential: a gated file is refused by the Hub).

With several workers a purge reaches every one: the worker asked drops the objects from the
shared ledger (every worker's index follows it at its next lookup), and asks each other worker
over its peer socket (`relay.net.peers`) to purge what it is filling; `purged` sums them all.
A prefetch runs in the worker asked; a client of another worker follows its fill.

Prefetch is the cache's own endpoint rather than a downloads job: a job writes a file under
`data_dir`, while warming the cache is exactly a fill, with its coalescing, budget and checks.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from relay.cache.admission import fill_request, key_variant
from relay.cache.cache import Cache, FillOrder
from relay.cache.fill import Fill
from relay.cache.hub import HubFile, hub_key_of_purge
from relay.cache.key import base_key
from relay.config import SINGLE_PROCESS, Config, WorkerInfo
from relay.credentials import AdminAuth
from relay.errors import ClientError, UpstreamError
from relay.net.peers import ask_peers, is_peer_request
from relay.net.presets import is_hub_file
from relay.net.routing import RouteTable
from relay.proxy.headers import shared_request_headers

logger = logging.getLogger(__name__)

_NO_STORE = {"Cache-Control": "no-store"}


def routes(config: Config) -> list[BaseRoute]:
    if not config.cache_dir:
        return []
    admin = AdminAuth(token=config.admin_token, header=config.admin_header)
    return [
        Route("/cache/purge", _guard(purge_prefix, admin), methods=["POST"]),
        Route("/cache/prefetch", _guard(prefetch, admin), methods=["POST"]),
        Route("/cache/scrub", _guard(scrub, admin), methods=["GET", "POST"]),
        Route("/cache/{path:path}", _guard(purge_one, admin), methods=["DELETE"]),
    ]


def _guard(endpoint: Any, admin: AdminAuth) -> Any:
    async def guarded(request: Request) -> Response:
        try:
            admin.check(request.headers.raw)
            return await endpoint(request)  # type: ignore[no-any-return]
        except (ClientError, UpstreamError) as exc:
            return JSONResponse({"error": exc.reason}, exc.status_code, headers=_NO_STORE)

    return guarded


def _cache(request: Request) -> Cache:
    cache = getattr(request.state, "cache", None)
    if not isinstance(cache, Cache):
        raise _NotFound("the cache is off")
    return cache


class _NotFound(ClientError):
    status_code = 404


async def _json_field(request: Request, name: str) -> str:
    try:
        body = json.loads(await request.body())
    except (ValueError, RecursionError):  # RecursionError: deeply nested arrays or objects
        raise ClientError("body must be JSON") from None
    value = body.get(name) if isinstance(body, dict) else None
    if not isinstance(value, str) or not value.startswith("/"):
        raise ClientError(f'body must be {{"{name}": "/relayed/path"}}')
    return value


def _split(path: str) -> tuple[bytes, bytes]:
    raw, _, query = path.partition("?")
    return raw.encode("latin-1", "replace"), query.encode("latin-1", "replace")


async def purge_one(request: Request) -> Response:
    cache = _cache(request)
    raw_path = request.scope.get("raw_path") or request.url.path.encode()
    raw_path = raw_path[len(b"/cache") :]
    query = request.scope.get("query_string", b"")
    target = RouteTable(cache.config.routes).resolve(raw_path, query)
    key = hub_key_of_purge(target.route, target.rest) or base_key(
        target.route.prefix, raw_path, query
    )
    purged = cache.purge_key(key) + await _peers_purged(request, cache.config)
    return JSONResponse({"purged": purged}, 200 if purged else 404, headers=_NO_STORE)


async def purge_prefix(request: Request) -> Response:
    cache = _cache(request)
    raw_path, query = _split(await _json_field(request, "prefix"))
    target = RouteTable(cache.config.routes).resolve(raw_path, query)
    purged = cache.purge_prefix(base_key(target.route.prefix, raw_path, b""))
    purged += await _peers_purged(request, cache.config)
    return JSONResponse({"purged": purged}, headers=_NO_STORE)


async def _peers_purged(request: Request, config: Config) -> int:
    """With several workers: the same purge asked of every other worker (unless this is such
    a request), for what each is filling; what they purged. A peer that does not answer gets
    a warning line: what it stored is purged already (the ledger), what it fills is not."""
    worker = getattr(request.app.state, "worker", SINGLE_PROCESS)
    if not isinstance(worker, WorkerInfo) or not worker.shared or is_peer_request(request.scope):
        return 0
    query = request.url.query
    path = request.url.path + (f"?{query}" if query else "")
    credential = request.headers.get(config.admin_header)
    headers = {config.admin_header: credential} if credential is not None else {}
    answers = await ask_peers(
        worker, request.method, path, headers=headers, content=await request.body()
    )
    purged = 0
    for answer in answers:
        if answer.response is None:
            logger.warning("cache: purge not passed to worker %d: %s", answer.index, answer.error)
            continue
        try:
            count = answer.response.json().get("purged", 0)
        except ValueError:
            count = 0
        purged += count if isinstance(count, int) else 0
    return purged


async def scrub(request: Request) -> Response:
    cache = _cache(request)
    runs = cache.scrub
    if request.method == "POST":
        started = runs.start("admin")
        last = runs.last
        assert last is not None
        body = {"state": "started" if started else "running", **last.as_json()}
        return JSONResponse(body, 202 if started else 409, headers=_NO_STORE)
    if runs.last is None:
        return JSONResponse({"state": "never"}, headers=_NO_STORE)
    state = "running" if runs.running else "done"
    return JSONResponse({"state": state, **runs.last.as_json()}, headers=_NO_STORE)


async def prefetch(request: Request) -> Response:
    cache = _cache(request)
    raw_path, query = _split(await _json_field(request, "path"))
    target = RouteTable(cache.config.routes).resolve(raw_path, query)
    route = target.route
    if not route.cache:
        raise ClientError("the route is not cached (cache = false)")
    upstream = cache.upstream
    if is_hub_file(route, target.rest):
        # A Hub file is stored under its sha256, as the Hub names it now (relay/cache/hub.py).
        headers = shared_request_headers(route, accept_encoding="identity")
        hub_file = await HubFile.ask(upstream, target, headers)
        if hub_file is None:
            raise ClientError(
                "the Hub's answer names no sha256 for this file (a regular, missing or "
                "gated file): not prefetched"
            )
        if cache.lookup(hub_file.key, "identity") is not None:
            return JSONResponse({"state": "cached"}, headers=_NO_STORE)
        return _prefetching(
            cache.background_fill(
                FillOrder(
                    hub_file.key, "identity", hub_file.fill_request(), route, sha256=hub_file.sha256
                )
            )
        )
    base = base_key(route.prefix, raw_path, query)
    variant = key_variant(route, None)
    if cache.lookup(base, variant) is not None:
        return JSONResponse({"state": "cached"}, headers=_NO_STORE)
    return _prefetching(
        cache.background_fill(
            FillOrder(base, variant, fill_request(upstream, target, variant=variant), route)
        )
    )


def _prefetching(fill: Fill | None) -> Response:
    if fill is None:
        return JSONResponse(
            {"error": "too many cache fills running without a client; retry shortly"},
            503,
            headers={**_NO_STORE, "Retry-After": "5"},
        )
    fill.prefetch = True
    return JSONResponse({"state": "filling"}, 202, headers=_NO_STORE)
