"""Naive baseline relay: Starlette + one shared httpx.AsyncClient (default transport and limits),
``StreamingResponse(resp.aiter_raw())``, under uvicorn with its defaults (uvloop + httptools when
installed). It is the reference row "what you get without tuning".

    python -m bench.baseline_relay --port 8001 --upstream http://127.0.0.1:9000/ [--prefix /o/]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

PASS_HEADERS = ("content-length", "content-type", "etag", "last-modified", "accept-ranges")


def make_app(upstream: str, prefix: str) -> Starlette:
    upstream = upstream.rstrip("/") + "/"
    prefix = "/" + prefix.strip("/")
    state: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient() as client:
            state["client"] = client
            yield

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def relay(request: Request) -> Response:
        client = state["client"]
        path: str = request.path_params["path"]
        url = upstream + path
        if request.url.query:
            url += "?" + request.url.query
        resp = await client.send(client.build_request("GET", url), stream=True)
        headers = {k: v for k in PASS_HEADERS if (v := resp.headers.get(k)) is not None}
        return StreamingResponse(
            resp.aiter_raw(),
            status_code=resp.status_code,
            headers=headers,
            background=BackgroundTask(resp.aclose),
        )

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route(prefix + "/{path:path}", relay),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8001)
    p.add_argument("--upstream", required=True)
    p.add_argument("--prefix", default="/o/")
    p.add_argument("--log-level", default="warning")
    a = p.parse_args()
    uvicorn.run(make_app(a.upstream, a.prefix), host=a.host, port=a.port, log_level=a.log_level)


if __name__ == "__main__":
    main()
