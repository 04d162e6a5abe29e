"""The application factory."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import TypedDict

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from relay.cache.admin import routes as cache_routes
from relay.cache.admission import cached_response
from relay.cache.cache import Cache, open_cache
from relay.cache.clock import SYSTEM_CLOCK, Clock
from relay.config import SINGLE_PROCESS, Config, WorkerInfo
from relay.downloads import open_downloads
from relay.downloads import routes as download_routes
from relay.errors import ClientError, NoRoute, StartupError, error_response
from relay.net.client import UpstreamClient
from relay.net.mirrors import MirrorBoard
from relay.net.routing import RouteTable
from relay.net.transports import PooledTransport, make_transport
from relay.net.upstream import Upstream
from relay.proxy.admission import StreamLimiter
from relay.proxy.exchange import exchange_of
from relay.proxy.forwarded import ForwardedPolicy
from relay.proxy.headers import upstream_request_headers
from relay.proxy.shared_admission import SLOTS_FILE, SharedStreamLimiter
from relay.proxy.streaming import RelayResponse
from relay.registry.endpoint import Registry
from relay.server.auth import ClientAuth, ClientAuthMiddleware
from relay.server.health import Readiness, healthz, readyz
from relay.server.metrics import Metrics
from relay.server.observe import ObserveMiddleware
from relay.server.supervisor import server_readiness
from relay.types import REQUEST_ID_KEY, ASGIApp, Message, Receive, Scope, Send


class LifespanState(TypedDict):
    """What the lifespan yields: Starlette gives it to each request as `request.state`."""

    upstream: Upstream
    routes: RouteTable
    downloads: object | None
    cache: Cache | None


class Relay:
    """The relay endpoint: maps the raw path, then hands over to a RelayResponse."""

    def __init__(self, config: Config, routes: RouteTable, limiter: StreamLimiter) -> None:
        self._routes = routes
        self._forwarded = ForwardedPolicy(config.trusted_networks())
        self.limiter = limiter
        self._config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Routed to as an ASGI app, not as a function: Starlette then builds no Request and
        # skips its per-request exception wrapping (~8% of a small request's CPU). Nothing
        # here raises HTTPException.
        await self.response(scope)(scope, receive, send)

    def response(self, scope: Scope) -> Response:
        try:
            return self._relay(scope)
        except ClientError as exc:  # the one place a refused request becomes its answer
            exchange_of(scope).outcome = "rejected"
            return error_response(exc)

    def _relay(self, scope: Scope) -> Response:
        exchange = exchange_of(scope)
        raw_path = scope.get("raw_path") or scope["path"].encode("ascii", "replace")
        target = self._routes.resolve(raw_path, scope.get("query_string", b""))
        exchange.route = target.route.prefix
        if target.route.preset == "oci":
            raise NoRoute(
                f"an oci route answers the registry API only, under {target.route.prefix}v2/"
            )
        client = scope.get("client")
        forwarded = self._forwarded.resolve(
            client[0] if client else None, scope.get("scheme", "http"), scope["headers"]
        )
        headers = upstream_request_headers(
            scope["headers"],
            forwarded=forwarded,
            route=target.route,
            request_id=scope.get(REQUEST_ID_KEY),
        )
        # The stream slot is taken and released by the response itself, around everything
        # it does (building the upstream request included).
        upstream: Upstream = scope["state"]["upstream"]

        def relayed(opened: httpx.Response | None = None) -> Response:
            return RelayResponse(
                upstream,
                scope["method"],
                target,
                headers,
                routes=self._routes,
                limiter=self.limiter,
                client=forwarded.client,
                config=self._config,
                opened=opened,
            )

        cache: Cache | None = scope["state"].get("cache")
        if cache is None:
            return relayed()
        cached = cached_response(
            cache,
            upstream,
            method=scope["method"],
            target=target,
            raw_path=raw_path,
            query=scope.get("query_string", b""),
            client_headers=scope["headers"],
            headers=headers,
            routes=self._routes,
            relayed=relayed,
            limiter=self.limiter,
            client=forwarded.client,
            send_timeout=self._config.send_timeout,
        )
        return cached if cached is not None else relayed()


class RelayFirst:
    """Hands relayed requests straight to the relay endpoint, everything else to the router.

    The registry API of oci routes (`/v2/...`) goes to `registry`, whatever the method. A GET
    or HEAD whose path is not under one of relay's own routes (health, metrics,
    downloads) can only end at the relay catch-all; going there directly skips Starlette's
    exception middleware, a regex match per route and the endpoint wrapper (~5% of a small
    request's CPU). Other requests (other methods: 405 with Allow) take the router as before.
    """

    def __init__(
        self,
        app: ASGIApp,
        relay: Relay,
        own_routes: list[BaseRoute],
        registry: Registry | None = None,
    ) -> None:
        self.app = app
        self.relay = relay
        self.registry = registry
        self.own_paths = tuple(
            route.path.partition("{")[0] for route in own_routes if isinstance(route, Route)
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        registry = self.registry
        if scope["type"] == "http" and registry is not None and registry.claims(scope["path"]):
            await registry(scope, receive, send)  # every method: writes get the registry's 405
        elif (
            scope["type"] == "http"
            and scope["method"] in _RELAYED_METHODS
            and not scope["path"].startswith(self.own_paths)
        ):
            await self.relay(scope, receive, send)
        else:
            await self.app(scope, receive, send)


_RELAYED_METHODS = frozenset({"GET", "HEAD"})


class QuietStartupErrors:
    """A StartupError is told in its one line, not in the traceback Starlette hands uvicorn.

    The lifespan records it on `app.state.startup_error`; `relay serve` prints it and exits 1.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_quietly(message: Message) -> None:
            failed = message["type"] == "lifespan.startup.failed"
            if failed and getattr(scope["app"].state, "startup_error", None) is not None:
                message = {"type": message["type"], "message": ""}
            await send(message)

        await self.app(scope, receive, send_quietly)


def create_app(
    config: Config,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    worker: WorkerInfo = SINGLE_PROCESS,
) -> Starlette:
    """Build relay's ASGI app. `transport` replaces the upstream transport (tests, benches);
    `clock` the time the cache reads (tests: `relay.cache.clock.ManualClock`); `worker` which
    of the server's processes runs it (`relay.config.WorkerInfo`; one process by default)."""
    readiness = Readiness()
    routes = RouteTable(config.routes)
    mirrors = MirrorBoard(config.routes, (clock or SYSTEM_CLOCK).monotonic)
    limiter: StreamLimiter
    if worker.shared:
        assert worker.run_dir is not None
        # max_streams and max_streams_per_client hold for the whole server.
        limiter = SharedStreamLimiter(
            worker.run_dir / SLOTS_FILE,
            worker=worker.index,
            workers=worker.count,
            limit=config.max_streams,
            per_client=config.max_streams_per_client,
        )
        readiness.server = server_readiness(worker)
    else:
        limiter = StreamLimiter(config.max_streams, config.max_streams_per_client)
    relay = Relay(config, routes, limiter)
    auth = ClientAuth(
        secret=config.client_secret,
        secret_header=config.client_secret_header,
        signing_key=config.signing_key,
    )
    registry = None
    if any(route.preset == "oci" for route in config.routes):
        registry = Registry(
            config,
            relay.limiter,
            clock or SYSTEM_CLOCK,
            check_client=auth.check_registry if auth.enabled else None,
        )
    metrics = Metrics(
        routes=[route.prefix for route in config.routes],
        max_streams=config.max_streams,
        worker=worker,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[LifespanState]:
        upstream_transport = transport if transport is not None else make_transport(config)
        pool = None
        if isinstance(upstream_transport, PooledTransport):
            pool = upstream_transport.pool_stats
            metrics.watch_pool(pool, limit=config.max_connections)
        async with UpstreamClient(
            transport=upstream_transport, follow_redirects=False, trust_env=False
        ) as client:
            upstream = Upstream(client, config, pool=pool, mirrors=mirrors)
            if registry is not None:
                registry.open(upstream)
            try:
                async with (
                    open_downloads(config, upstream, routes, shared=worker.shared) as downloads,
                    open_cache(config, upstream, clock or SYSTEM_CLOCK, worker) as cache,
                ):
                    if cache is not None:
                        metrics.watch_cache(cache)
                    metrics.watch_registry(registry)
                    if downloads is not None:
                        metrics.watch_downloads(downloads.counts, limit=config.max_downloads)
                    readiness.started = True
                    try:
                        yield {
                            "upstream": upstream,
                            "routes": routes,
                            "downloads": downloads,
                            "cache": cache,
                        }
                    finally:
                        readiness.draining = True
            except StartupError as exc:
                app.state.startup_error = exc
                raise

    own_routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics.endpoint, methods=["GET"]),
        *download_routes(config),
        *cache_routes(config),
    ]
    app = Starlette(
        routes=[*own_routes, Route("/{path:path}", relay, methods=["GET", "HEAD"])],
        middleware=[
            Middleware(QuietStartupErrors),
            Middleware(ObserveMiddleware, metrics=metrics, access_log=config.access_log),
            # Without client authentication configured, not a layer every request passes.
            *(
                [
                    Middleware(
                        ClientAuthMiddleware,
                        auth=auth,
                        # The registry API authenticates its clients itself, in its own
                        # error form.
                        skip=registry.claims if registry is not None else None,
                    )
                ]
                if auth.enabled
                else []
            ),
            Middleware(RelayFirst, relay=relay, own_routes=own_routes, registry=registry),
        ],
        lifespan=lifespan,
    )
    app.state.readiness = readiness
    app.state.mirrors = mirrors
    metrics.watch_mirrors(mirrors)
    metrics.watch_readiness(lambda: readiness.ready)
    app.state.worker = worker
    app.state.startup_error = None
    app.state.limiter = relay.limiter
    return app
