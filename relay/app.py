"""The application factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import TypedDict

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from relay.config import Config
from relay.downloads import open_downloads
from relay.downloads import routes as download_routes
from relay.errors import ClientError
from relay.exchange import exchange_of
from relay.headers import upstream_request_headers
from relay.health import Readiness, healthz, readyz
from relay.metrics import Metrics
from relay.observe import ObserveMiddleware
from relay.routing import RouteTable
from relay.streaming import RelayResponse, error_response
from relay.transports import make_transport
from relay.upstream import Upstream


class State(TypedDict):
    upstream: Upstream
    routes: RouteTable
    downloads: object | None


async def relay_endpoint(request: Request) -> Response:
    scope = request.scope
    routes: RouteTable = request.state.routes
    raw_path = scope.get("raw_path") or scope["path"].encode("ascii", "replace")
    exchange = exchange_of(scope)
    try:
        target = routes.resolve(raw_path, scope.get("query_string", b""))
    except ClientError as exc:
        exchange.outcome = "rejected"
        return error_response(exc)
    exchange.route = target.route.prefix
    client = scope.get("client")
    headers = upstream_request_headers(
        scope["headers"],
        client_addr=client[0] if client else None,
        scheme=scope.get("scheme", "http"),
    )
    upstream: Upstream = request.state.upstream
    return RelayResponse(upstream, upstream.build_request(request.method, target.url, headers))


def refuse_all_cookies() -> CookieJar:
    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def create_app(config: Config, *, transport: httpx.AsyncBaseTransport | None = None) -> Starlette:
    """Build relay's ASGI app. `transport` replaces the upstream transport (tests, benches)."""
    readiness = Readiness()
    routes = RouteTable(config.routes)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[State]:
        async with httpx.AsyncClient(
            transport=transport if transport is not None else make_transport(config),
            follow_redirects=False,
            trust_env=False,
            # One client serves every user: it must never remember an upstream's cookies.
            cookies=refuse_all_cookies(),
        ) as client:
            upstream = Upstream(client, config)
            async with open_downloads(config, upstream, routes) as downloads:
                readiness.started = True
                try:
                    yield {"upstream": upstream, "routes": routes, "downloads": downloads}
                finally:
                    readiness.draining = True

    metrics = Metrics()
    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics.endpoint, methods=["GET"]),
            *download_routes(),
            Route("/{path:path}", relay_endpoint, methods=["GET", "HEAD"]),
        ],
        middleware=[Middleware(ObserveMiddleware, metrics=metrics)],
        lifespan=lifespan,
    )
    app.state.readiness = readiness
    app.state.config = config
    return app
