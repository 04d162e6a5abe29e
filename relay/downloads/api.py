"""The /downloads endpoints: create, list, inspect and cancel or delete download jobs.

    POST   /downloads        {"path"|"url", "sha256"?, "size"?, "name"?}
                             -> 202 + Location (new or still running), 200 (already done)
    GET    /downloads        ?limit=N (1-1000, default 100) -> {"downloads": [job, ...]}
    GET    /downloads/{id}   -> job
    DELETE /downloads/{id}   active: cancelled, partial removed -> 200 + job;
                             finished: record (and a completed job's file) removed -> 204

Every error is a short JSON object, `{"error": "field: reason", "field": "field"}`.
Without the admin credential every endpoint answers 401 (none sent) or 403 (a wrong one),
unless `downloads_open` is set. A full store answers 507 (downloads_max_jobs,
downloads_max_bytes).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from relay.credentials import AdminAuth
from relay.downloads.intake import parse_order
from relay.downloads.jobs import DownloadManager
from relay.downloads.names import is_job_id
from relay.errors import (
    DownloadsError,
    InvalidField,
    NotFound,
    RelayError,
    json_error_response,
)

MAX_BODY = 16 * 1024
LIST_DEFAULT = 100
LIST_MAX = 1000
NO_STORE = {"Cache-Control": "no-store"}

Endpoint = Callable[[Request], Awaitable[Response]]


def json_errors(endpoint: Endpoint) -> Endpoint:
    """The downloads API's one error boundary: any RelayError answered as JSON, no-store."""

    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        try:
            return await endpoint(request)
        except RelayError as exc:
            return json_error_response(exc, NO_STORE)

    return wrapper


def admin_only(endpoint: Endpoint, admin: AdminAuth | None) -> Endpoint:
    """`endpoint` behind the admin credential, checked before the body is read (None: open)."""
    if admin is None:
        return endpoint

    @json_errors
    @functools.wraps(endpoint)
    async def wrapper(request: Request) -> Response:
        admin.check(request.headers.raw)
        return await endpoint(request)

    return wrapper


def manager_of(request: Request) -> DownloadManager:
    manager = getattr(request.state, "downloads", None)
    if not isinstance(manager, DownloadManager):
        raise NotFound("downloads to disk are off: relay runs without a data_dir")
    return manager


@json_errors
async def downloads(request: Request) -> Response:
    manager = manager_of(request)
    if request.method == "POST":
        return await _create(request, manager)
    limit = _limit(request.query_params.get("limit"))
    jobs = await manager.latest(limit)
    return JSONResponse({"downloads": [j.to_json() for j in jobs]}, headers=NO_STORE)


@json_errors
async def download(request: Request) -> Response:
    manager = manager_of(request)
    job_id = request.path_params["job_id"]
    if not is_job_id(job_id):
        raise NotFound("no such download")
    if request.method == "DELETE":
        job = await manager.remove(job_id)
        if job is None:
            return Response(status_code=204)
    else:
        job = await manager.get(job_id)
    return JSONResponse(job.to_json(), headers=NO_STORE)


async def _create(request: Request, manager: DownloadManager) -> Response:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise DownloadsError("expected Content-Type: application/json", status_code=415)
    data = _parse_json(await _read_body(request))
    order = parse_order(data, manager.route_table)
    job = await manager.submit(order)
    return JSONResponse(
        job.to_json(),
        202 if job.state.active else 200,
        headers={"Location": f"/downloads/{job.id}", **NO_STORE},
    )


async def _read_body(request: Request) -> bytes:
    too_large = DownloadsError(f"body larger than {MAX_BODY} bytes", status_code=413)
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > MAX_BODY:
        raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise too_large
    except ClientDisconnect:
        # The server closed the connection (body_timeout, max_body_bytes) or the client left:
        # nobody reads this answer, but the request ends here, not as an unhandled error.
        raise DownloadsError("request body incomplete", status_code=400) from None
    return bytes(body)


def _parse_json(body: bytes) -> Any:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(body, parse_constant=no_constants)
    except (ValueError, RecursionError):
        raise DownloadsError("body: not valid JSON", status_code=400) from None


def _limit(value: str | None) -> int:
    if value is None:
        return LIST_DEFAULT
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= LIST_MAX:
        raise InvalidField("limit", f"expected an integer from 1 to {LIST_MAX}", status_code=400)
    return int(value)
