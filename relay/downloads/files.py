"""GET/HEAD /files/{name}: serving published files, with validators and single byte ranges.

relay decides every HTTP question itself: the name (matched on the raw path, so no escape
spelling reaches the disk), conditionals (If-None-Match, then If-Modified-Since, RFC 9110
13.2.2), If-Range and the range (one range; several or a malformed one are ignored and the
whole file is sent; an unsatisfiable one is 416). The ETag is strong and names the verified
sha256, so it changes exactly when the bytes do; Starlette's own would hash mtime and size.

The bytes are sent by Starlette's FileResponse, handed a request whose Range is relay's
normalised decision and whose If-Range is gone. FileResponse sends a whole file with the
ASGI `http.response.pathsend` extension when the server offers it (the server can then use
sendfile: zero-copy); uvicorn does not (0.54), so there, and for every range, the file is read
in `CHUNK`-sized blocks in a worker thread and each block is copied into the socket.
"""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from relay.downloads.api import NO_STORE, json_errors, manager_of
from relay.downloads.names import NAME_PATTERN, is_name
from relay.errors import InvalidField, NotFound
from relay.http.ranges import Unsatisfiable, parse_range
from relay.http.validators import (
    format_http_date,
    if_range_holds,
    none_match,
    not_modified_since,
)
from relay.types import Receive, Scope, Send

PREFIX = b"/files/"
CHUNK = 256 * 1024
"""Bytes per read when the server cannot send the file itself: one block per thread hop."""


class _ChunkedFileResponse(FileResponse):
    chunk_size = CHUNK


class StoredFileResponse(Response):
    """A FileResponse that serves exactly the range relay decided on, or the whole file."""

    def __init__(
        self,
        path: Path,
        stat_result: os.stat_result,
        headers: dict[str, str],
        span: tuple[int, int] | None,
    ) -> None:
        # Response.__init__ would render a body; FileResponse sends this one.
        self._file = _ChunkedFileResponse(
            path,
            stat_result=stat_result,
            headers=headers,
            media_type="application/octet-stream",
        )
        self._span = span
        self.status_code = 200 if span is None else 206
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]
        if self._span is not None:
            start, stop = self._span
            headers.append((b"range", f"bytes={start}-{stop - 1}".encode("ascii")))
        await self._file({**scope, "headers": headers}, receive, send)


@json_errors
async def serve_file(request: Request) -> Response:
    manager = manager_of(request)
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    raw_name = raw_path[len(PREFIX) :] if raw_path.startswith(PREFIX) else b""
    # Names never need escaping, so the raw bytes must already be a valid name.
    name = raw_name.decode("ascii", "replace")
    if not is_name(name):
        raise InvalidField("name", f"must match {NAME_PATTERN}", status_code=400)
    published = await manager.published(name)
    if published is None:
        raise NotFound("no such file")
    path, job = published
    try:
        st = await asyncio.to_thread(os.lstat, path)
    except FileNotFoundError:
        raise NotFound("no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotFound("no such file")

    etag = f'"sha256-{job.sha256}"'
    last_modified = format_http_date(st.st_mtime)
    headers = {
        "etag": etag,
        "last-modified": last_modified,
        "accept-ranges": "bytes",
        # The bytes are whatever the upstream sent: never let a browser run them as a page
        # of relay's origin.
        "x-content-type-options": "nosniff",
        "content-security-policy": "default-src 'none'; sandbox",
    }
    if_none_match = request.headers.get("if-none-match")
    if_modified_since = request.headers.get("if-modified-since")
    if (if_none_match is not None and none_match(if_none_match, etag)) or (
        if_none_match is None
        and if_modified_since is not None
        and not_modified_since(if_modified_since, st.st_mtime)
    ):
        return Response(status_code=304, headers=headers)

    range_header = request.headers.get("range") if request.method == "GET" else None
    if_range = request.headers.get("if-range")
    if if_range is not None and not if_range_holds(if_range, etag, last_modified):
        range_header = None
    try:
        span = parse_range(range_header, st.st_size)
    except Unsatisfiable:
        return Response(
            f"416 range not satisfiable for {st.st_size} bytes\n",
            416,
            headers={**headers, "content-range": f"bytes */{st.st_size}", **NO_STORE},
            media_type="text/plain",
        )
    return StoredFileResponse(path, st, headers, span)
