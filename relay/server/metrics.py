"""Prometheus metrics, read from each request's Exchange once it is over.

Every app has its own `CollectorRegistry`, so several apps (and tests) in one process never
share or collide on series. Nothing here runs per body chunk: the middleware calls `started`
when a request comes in and `observe` once when it is over.

Label values are bounded: `route` is a configured prefix or "-" (health, metrics, no route,
refused paths), `method` is GET, HEAD or other, `status` is the status sent (0 when none was:
the client left before the response started).

Limits are exported beside what they limit (`relay_max_streams` beside `relay_active_streams`,
`relay_upstream_max_connections` beside `relay_upstream_connections`, `relay_cache_max_bytes`
beside `relay_cache_size_bytes`, `relay_max_downloads` beside `relay_downloads`), so a dashboard
or an alert divides one by the other without knowing each deployment's settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from relay.cache.cache import Cache
from relay.config import SINGLE_PROCESS, WorkerInfo
from relay.downloads.jobs import JobCounts
from relay.net.mirrors import MirrorBoard
from relay.net.peers import ask_peers, is_peer_request
from relay.net.transports import PoolStats
from relay.proxy.exchange import Exchange
from relay.registry.endpoint import Registry
from relay.server.metrics_merge import Fixed, families_json, merge, peers_missing

NO_ROUTE = "-"

TTFB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
"""Upstream time to first byte: from in-cluster milliseconds to a read timeout's worth."""

DURATION_BUCKETS = (
    *(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    *(60, 300, 900, 1800, 3600, 7200, 14400),
)
"""Whole requests: health checks in milliseconds up to multi-gigabyte downloads over hours."""

POOL_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_METHODS = {"GET": "GET", "HEAD": "HEAD"}
_NO_STORE = {"Cache-Control": "no-store"}


def method_label(method: str) -> str:
    return _METHODS.get(method, "other")


class Metrics:
    """relay's metrics and the /metrics endpoint serving them.

    `routes` (the configured prefixes) creates their series up front at zero, so a rate over
    a counter that has not moved yet is 0 rather than absent. `max_streams` (the stream
    limiter's limit) is exported as `relay_max_streams` when given.
    """

    def __init__(
        self,
        routes: Iterable[str] = (),
        *,
        max_streams: int | None = None,
        worker: WorkerInfo = SINGLE_PROCESS,
    ) -> None:
        self.worker = worker
        # What is read at scrape time from this process's memory (with several workers,
        # gathered from each and summed: relay/server/metrics_merge.py).
        self.live = CollectorRegistry(auto_describe=True)
        # prometheus_client's `*_created` series double every counter and histogram in the
        # text format for nothing Prometheus needs. The switch is process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
        self.registry = registry = CollectorRegistry()
        self.requests = Counter(
            "relay_requests",
            "Requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.body_bytes = Counter(
            "relay_response_body_bytes",
            "Response body bytes sent to clients.",
            ["route"],
            registry=registry,
        )
        self.duration = Histogram(
            "relay_request_duration_seconds",
            "Seconds from receiving a request to the end of its response (or its abort).",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttfb = Histogram(
            "relay_upstream_ttfb_seconds",
            "Seconds from sending the upstream request to its response headers.",
            ["route"],
            buckets=TTFB_BUCKETS,
            registry=registry,
        )
        self.pool_wait = Histogram(
            "relay_upstream_pool_wait_seconds",
            "Seconds requests waited for a free upstream connection; only requests that had "
            "to wait are observed.",
            buckets=POOL_WAIT_BUCKETS,
            registry=registry,
        )
        self.resumes = Counter(
            "relay_resumes",
            "Upstream bodies resumed with Range after failing mid-transfer.",
            ["route"],
            registry=registry,
        )
        self.client_aborts = Counter(
            "relay_client_aborts",
            "Transfers the client went away from before they were complete.",
            ["route"],
            registry=registry,
        )
        self.upstream_aborts = Counter(
            "relay_upstream_aborts",
            "Client transfers aborted because the upstream failed mid-body.",
            ["route"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "relay_upstream_errors",
            "Requests answered 502, 503 or 504 by relay: the upstream could not be reached, "
            "had no free connection or sent no headers in time.",
            ["route"],
            registry=registry,
        )
        self._live: dict[int, Exchange] = {}
        self._routes: set[str] = set()
        # Labelled children looked up once: prometheus-client's labels() validates and locks
        # on every call, three times per request (~7 us) before these caches.
        self._series: dict[str, _RouteSeries] = {}
        self._request_counts: dict[tuple[str, str, int], Counter] = {}
        self._register_live(_ActiveStreams(self._live, self._routes))
        if max_streams is not None:
            Gauge(
                "relay_max_streams",
                "Relayed streams admitted at once (max_streams); past it requests get 503.",
                registry=registry,
                multiprocess_mode="max",  # the same server-wide limit in every worker
            ).set(max_streams)
        self._pool = _ByState(
            "relay_upstream_connections",
            "Upstream connections by state: in_use (checked out for a response) or idle.",
            "relay_upstream_max_connections",
            "Upstream connections open at once (max_connections); past it requests wait.",
        )
        self._register_live(self._pool)
        self._cache = _CacheCollector()
        self._register_live(self._cache)
        self._downloads = _ByState(
            "relay_downloads",
            "Downloads to disk by state: queued (waiting for a slot) or running.",
            "relay_max_downloads",
            "Downloads to disk running at once (max_downloads); the rest wait queued.",
        )
        self._register_live(self._downloads)
        self._mirrors = _Mirrors()
        self._register_live(self._mirrors)
        self._ready = _Ready()
        self._register_live(self._ready)
        self._registry = _RegistryCollector()
        self._register_live(self._registry)
        self._register_live(ProcessCollector(registry=None))
        for route in routes:
            self._add_route(route)
        self._files = (
            MultiProcessCollector(None)  # type: ignore[no-untyped-call]  # untyped upstream
            if worker.shared
            else None
        )

    def _register_live(self, collector: Collector) -> None:
        self.registry.register(collector)
        self.live.register(collector)

    def _add_route(self, route: str) -> None:
        self._routes.add(route)
        self._route_series(route)

    def _route_series(self, route: str) -> _RouteSeries:
        series = self._series.get(route)
        if series is None:
            series = self._series[route] = _RouteSeries(
                body_bytes=self.body_bytes.labels(route),
                duration=self.duration.labels(route),
                ttfb=self.ttfb.labels(route),
                resumes=self.resumes.labels(route),
                client_aborts=self.client_aborts.labels(route),
                upstream_aborts=self.upstream_aborts.labels(route),
                upstream_errors=self.upstream_errors.labels(route),
            )
        return series

    def _request_count(self, route: str, method: str, status: int) -> Counter:
        key = (route, method, status)
        child = self._request_counts.get(key)
        if child is None:
            child = self._request_counts[key] = self.requests.labels(
                route, method_label(method), str(status)
            )
        return child

    def started(self, exchange: Exchange) -> None:
        """A request came in; it counts as an active stream once routed, until `observe`."""
        self._live[id(exchange)] = exchange

    def observe(
        self, exchange: Exchange, *, method: str, status: int, body_bytes: int, duration: float
    ) -> None:
        """Record a request that is over, once."""
        self._live.pop(id(exchange), None)
        route = exchange.route
        if route != NO_ROUTE and route not in self._routes:
            self._add_route(route)
        self._request_count(route, method, status).inc()
        series = self._route_series(route)
        series.duration.observe(duration)
        if body_bytes:
            series.body_bytes.inc(body_bytes)
        if exchange.upstream_ttfb is not None:
            series.ttfb.observe(exchange.upstream_ttfb)
        if exchange.pool_wait is not None:
            self.pool_wait.observe(exchange.pool_wait)
        if exchange.resumes:
            series.resumes.inc(exchange.resumes)
        outcome = exchange.outcome
        if outcome in ("client_abort", "client_slow"):
            series.client_aborts.inc()
        elif outcome == "upstream_abort":
            series.upstream_aborts.inc()
        elif outcome == "upstream_error":
            series.upstream_errors.inc()

    def watch_pool(self, source: Callable[[], PoolStats] | None, *, limit: int) -> None:
        """Report the upstream pool (the transport's pool_stats) at every scrape, and its size
        (`limit`: max_connections) beside it."""
        self._pool.source = source
        self._pool.limit = limit

    def watch_downloads(self, source: Callable[[], JobCounts] | None, *, limit: int) -> None:
        """Report the downloads to disk queued and running at every scrape, and how many may
        run at once (`limit`: max_downloads)."""
        self._downloads.source = source
        self._downloads.limit = limit

    def watch_readiness(self, ready: Callable[[], bool]) -> None:
        """Report `relay_ready` (what /readyz answers: 1 ready, 0 not) at every scrape."""
        self._ready.source = ready

    def watch_mirrors(self, board: MirrorBoard) -> None:
        """Report the passive health of every mirror of the routes that have several."""
        self._mirrors.board = board

    def watch_cache(self, cache: Cache | None) -> None:
        """Report the read-through cache's counters and size at every scrape."""
        self._cache.cache = cache

    def watch_registry(self, source: Registry | None) -> None:
        """Report the registry mirror's token fetches and tag answers at every scrape."""
        self._registry.source = source

    async def endpoint(self, request: Request) -> Response:
        if self._files is None:
            body = generate_latest(self.registry)
        elif is_peer_request(request.scope):
            return JSONResponse(families_json(self.live), headers=_NO_STORE)
        else:
            body = await self._server_wide()
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers=_NO_STORE)

    async def _server_wide(self) -> bytes:
        """Every worker's metrics in one exposition (several workers)."""
        assert self._files is not None
        answers = await ask_peers(self.worker, "GET", "/metrics")
        gathered = [families_json(self.live)]
        missing = 0
        for answer in answers:
            if answer.response is None or answer.response.status_code != 200:
                missing += 1
                continue
            gathered.append(answer.response.json())
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._files)
        registry.register(Fixed([*merge(gathered), peers_missing(missing)]))
        return generate_latest(registry)


@dataclass(slots=True, frozen=True)
class _RouteSeries:
    """One route's labelled children."""

    body_bytes: Counter
    duration: Histogram
    ttfb: Histogram
    resumes: Counter
    client_aborts: Counter
    upstream_aborts: Counter
    upstream_errors: Counter


class _Mirrors(Collector):
    """Each mirror of a route with several: up or resting, failures, requests passed on.
    Labels: the route's prefix and the mirror's place in `upstreams` (1-based): bounded by
    the configuration."""

    def __init__(self) -> None:
        self.board: MirrorBoard | None = None

    def _families(self) -> tuple[GaugeMetricFamily, CounterMetricFamily, CounterMetricFamily]:
        labels = ["route", "mirror"]
        return (
            GaugeMetricFamily(
                "relay_upstream_mirror_up",
                "1 while the mirror is asked, 0 while it rests after failures (max_fails).",
                labels=labels,
            ),
            CounterMetricFamily(
                "relay_upstream_mirror_failures",
                "Failures of the mirror: connect errors, timeouts, 5xx and 429 answers.",
                labels=labels,
            ),
            CounterMetricFamily(
                "relay_upstream_mirror_fall_throughs",
                "Requests the mirror did not answer that went on to the next mirror.",
                labels=labels,
            ),
        )

    def describe(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        board = self.board
        if board is None:
            return
        up, failures, passed = self._families()
        now = board.now()
        for route in board.routes.values():
            if not route.several:
                continue
            for health in route.health:
                labels = [route.prefix, str(health.index + 1)]
                up.add_metric(labels, 0 if health.resting(now) else 1)
                failures.add_metric(labels, health.failures)
                passed.add_metric(labels, health.fall_throughs)
        yield from (up, failures, passed)


class _Ready(Collector):
    """`relay_ready`: 1 while /readyz answers ready, 0 while it answers 503 (starting,
    draining, workers not all up). Nothing is exported until a source is set."""

    NAME = "relay_ready"
    HELP = "1 while relay answers /readyz as ready, 0 while not (starting, draining, workers down)."

    def __init__(self) -> None:
        self.source: Callable[[], bool] | None = None

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.source is not None:
            yield GaugeMetricFamily(self.NAME, self.HELP, value=1 if self.source() else 0)


class _ByState(Collector):
    """A gauge by state and the limit on their sum, read at scrape time from a source
    returning a NamedTuple (one state per field: PoolStats, JobCounts). Nothing is exported
    until a source is set."""

    def __init__(self, name: str, help_text: str, max_name: str, max_help: str) -> None:
        self.families = (name, help_text, max_name, max_help)
        self.source: Callable[[], PoolStats | JobCounts] | None = None
        self.limit = 0

    def describe(self) -> Iterator[GaugeMetricFamily]:
        name, help_text, max_name, max_help = self.families
        yield GaugeMetricFamily(name, help_text, labels=["state"])
        yield GaugeMetricFamily(max_name, max_help)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.source is None:
            return
        name, help_text, max_name, max_help = self.families
        family = GaugeMetricFamily(name, help_text, labels=["state"])
        for state, value in self.source()._asdict().items():
            family.add_metric([state], value)
        yield family
        yield GaugeMetricFamily(max_name, max_help, value=self.limit)


_CACHE_COUNTERS = (
    ("hits", "Requests answered from a fresh cached object."),
    ("misses", "Requests that found no cached object (served from a fill)."),
    ("revalidations", "Conditional requests sent to refresh a stale cached object."),
    ("stale", "Requests answered with a stale cached object (while revalidating or on error)."),
    ("revalidated", "Requests answered from a stale cached object the upstream confirmed (304)."),
    (
        "expired",
        "Requests whose stale cached object's revalidation brought a new response, answered "
        "from it.",
    ),
    ("coalesced", "Clients that joined a fill another client started."),
    ("bytes_from_cache", "Body bytes sent to clients from complete cached objects."),
    ("bytes_zero_copy", "Of bytes_from_cache, those sent with sendfile (zero-copy)."),
    ("bytes_from_upstream", "Body bytes fetched from upstreams by cache fills."),
    ("evictions", "Cached objects evicted to stay under cache_max_bytes."),
    (
        "digest_mismatches",
        "Objects dropped because their bytes did not match their digest (a fill, or stored "
        "bytes checked after a restart, by a scrub or as they were answered).",
    ),
    ("fills_failed", "Cache fills that failed (upstream, disk, no client) and stored nothing."),
    (
        "background_stopped",
        "Cache fills no client waited for that were stopped (over cache_background_fills, or "
        "to give a client's request their upstream connection); they stored nothing.",
    ),
)


class _CacheCollector(Collector):
    """relay_cache_*: the read-through cache's counters and size, read at scrape time."""

    def __init__(self) -> None:
        self.cache: Cache | None = None

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        return iter(())

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        cache = self.cache
        if cache is None:
            return
        for name, help_text in _CACHE_COUNTERS:
            yield CounterMetricFamily(
                f"relay_cache_{name}", help_text, value=getattr(cache.stats, name)
            )
        yield GaugeMetricFamily(
            "relay_cache_size_bytes",
            "Disk space the cache takes: stored objects' data and metadata files (rounded up "
            "to the filesystem's block) and its directories.",
            value=cache.index.on_disk,
        )
        yield GaugeMetricFamily(
            "relay_cache_max_bytes",
            "The cache's budget (cache_max_bytes): eviction keeps the disk space it takes, "
            "with what fills in flight reserved, under it.",
            value=cache.index.max_bytes,
        )
        yield GaugeMetricFamily(
            "relay_cache_objects", "Complete cached objects.", value=len(cache.index)
        )
        yield GaugeMetricFamily(
            "relay_cache_fills_in_flight",
            "Cache fills running (whole objects and slices), coalesced clients counted once.",
            value=cache.fills_running,
        )
        yield GaugeMetricFamily(
            "relay_cache_background_fills",
            "Cache fills running with no client waiting (clients left, prefetches, "
            "revalidations, read-ahead).",
            value=cache.background_fills(),
        )
        yield GaugeMetricFamily(
            "relay_cache_max_background_fills",
            "Cache fills that may run with no client waiting (cache_background_fills, within "
            "cache_background_share of max_connections).",
            value=cache.background_limit,
        )
        scrub = cache.scrub
        yield GaugeMetricFamily(
            "relay_cache_scrub_running",
            "1 while the cache's background verification (at startup, or a scrub) runs.",
            value=int(scrub.running),
        )
        for name, value, help_text in (
            ("objects_checked", scrub.total_checked, "Objects the background check verified."),
            ("bytes_hashed", scrub.total_bytes, "Bytes the background verification hashed."),
            ("mismatches", scrub.total_mismatches, "Objects it found not matching their digest."),
        ):
            yield CounterMetricFamily(f"relay_cache_scrub_{name}", help_text, value=value)


class _ActiveStreams(Collector):
    """relay_active_streams{route}: requests in flight on each route, counted at scrape time.

    Counted from the live requests rather than incremented and decremented: the route is only
    known after routing, and a request must be counted from then (including while it waits for
    the upstream) until it is over, whichever way it ends. Requests not routed to an upstream
    (health, metrics, 404) are not streams and are left out, so a scrape never counts itself.
    """

    NAME = "relay_active_streams"
    HELP = "Relayed requests in flight, from routing until the response is over."

    def __init__(self, live: dict[int, Exchange], routes: set[str]) -> None:
        self._live = live
        self._routes = routes

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["route"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(tuple(self._routes), 0)
        for exchange in tuple(self._live.values()):
            if exchange.route != NO_ROUTE:
                counts[exchange.route] = counts.get(exchange.route, 0) + 1
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["route"])
        for route, count in sorted(counts.items()):
            family.add_metric([route], count)
        yield family


class _RegistryCollector(Collector):
    """relay_registry_*: the oci routes' token fetches and tag answers (labels: the route
    prefix, configured, and a fixed outcome), read at scrape time."""

    def __init__(self) -> None:
        self.source: Registry | None = None

    def describe(self) -> Iterator[CounterMetricFamily]:
        return iter(())

    def collect(self) -> Iterator[CounterMetricFamily]:
        source = self.source
        if source is None:
            return
        tokens = CounterMetricFamily(
            "relay_registry_token_fetches",
            "Tokens relay asked upstream registries' realms for, by route and outcome.",
            labels=["route", "outcome"],
        )
        fetches = source.auth.token_fetches if source.auth is not None else {}
        for (route, outcome), value in sorted(fetches.items()):
            tokens.add_metric([route, outcome], value)
        yield tokens
        tags = CounterMetricFamily(
            "relay_registry_tag_answers",
            "Manifest-by-tag answers by route and outcome: hit, revalidated (a HEAD found the "
            "same digest), expired (moved), miss, stale (the upstream failed or answered 429), "
            "pass (no digest upstream).",
            labels=["route", "outcome"],
        )
        for (route, outcome), value in sorted(source.tag_answers.items()):
            tags.add_metric([route, outcome], value)
        yield tags
