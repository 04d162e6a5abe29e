"""Prometheus metrics: names, labels and values, from Exchange records and from a real relay."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay.downloads.jobs import JobCounts
from relay.net.transports import PoolStats
from relay.proxy.exchange import Exchange
from relay.server.metrics import Metrics
from tests.harness import RelayThread, abort_download, wait_until

MiB = 1024 * 1024

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def samples_of(metrics: Metrics) -> Samples:
    return parse(generate_latest(metrics.registry).decode())


def finished(
    metrics: Metrics,
    exchange: Exchange,
    status: int = 200,
    *,
    method: str = "GET",
    duration: float = 1.5,
) -> None:
    metrics.observe(
        exchange,
        method=method,
        status=status,
        body_bytes=exchange.bytes_sent,
        duration=duration,
    )


def test_metrics_request_is_counted_once_by_route_method_and_status() -> None:
    """One observe: one request, its bytes, its duration and its upstream ttfb."""
    metrics = Metrics()
    exchange = Exchange(route="/o/", upstream_status=206, upstream_ttfb=0.02, bytes_sent=1000)
    finished(metrics, exchange, 206, duration=2.0)
    s = samples_of(metrics)
    assert sample(s, "relay_requests_total", route="/o/", method="GET", status="206") == 1
    assert sample(s, "relay_response_body_bytes_total", route="/o/") == 1000
    assert sample(s, "relay_request_duration_seconds_count", route="/o/") == 1
    assert sample(s, "relay_request_duration_seconds_sum", route="/o/") == 2.0
    assert sample(s, "relay_upstream_ttfb_seconds_count", route="/o/") == 1
    assert sample(s, "relay_upstream_ttfb_seconds_bucket", route="/o/", le="0.025") == 1
    assert sample(s, "relay_upstream_ttfb_seconds_bucket", route="/o/", le="0.01") == 0


def test_metrics_method_label_is_get_head_or_other() -> None:
    metrics = Metrics()
    for method in ("GET", "HEAD", "PROPFIND", "DELETE"):
        finished(metrics, Exchange(), 405, method=method)
    s = samples_of(metrics)
    assert sample(s, "relay_requests_total", route="-", method="GET", status="405") == 1
    assert sample(s, "relay_requests_total", route="-", method="HEAD", status="405") == 1
    assert sample(s, "relay_requests_total", route="-", method="other", status="405") == 2


def test_metrics_outcomes_count_aborts_errors_and_resumes() -> None:
    metrics = Metrics()
    finished(metrics, Exchange(route="/o/", outcome="client_abort"))
    finished(metrics, Exchange(route="/o/", outcome="upstream_abort", resumes=3))
    finished(metrics, Exchange(route="/o/", outcome="upstream_error"), 504)
    finished(metrics, Exchange(route="/o/", resumes=1))
    s = samples_of(metrics)
    assert sample(s, "relay_client_aborts_total", route="/o/") == 1
    assert sample(s, "relay_upstream_aborts_total", route="/o/") == 1
    assert sample(s, "relay_upstream_errors_total", route="/o/") == 1
    assert sample(s, "relay_resumes_total", route="/o/") == 4


def test_metrics_pool_wait_is_observed_only_when_recorded() -> None:
    metrics = Metrics()
    finished(metrics, Exchange(route="/o/", pool_wait=0.3))
    finished(metrics, Exchange(route="/o/"))
    s = samples_of(metrics)
    assert sample(s, "relay_upstream_pool_wait_seconds_count") == 1
    assert sample(s, "relay_upstream_pool_wait_seconds_bucket", le="0.25") == 0
    assert sample(s, "relay_upstream_pool_wait_seconds_bucket", le="0.5") == 1


def test_metrics_configured_routes_start_at_zero() -> None:
    """Declared routes have their series from the start, so rates are 0, not absent."""
    s = samples_of(Metrics(routes=["/a/", "/b/"]))
    for route in ("/a/", "/b/"):
        assert sample(s, "relay_active_streams", route=route) == 0
        assert sample(s, "relay_client_aborts_total", route=route) == 0
        assert sample(s, "relay_upstream_aborts_total", route=route) == 0
        assert sample(s, "relay_response_body_bytes_total", route=route) == 0
        assert sample(s, "relay_request_duration_seconds_count", route=route) == 0


def test_metrics_active_streams_count_routed_requests_until_observed() -> None:
    """A request counts from routing until it is observed; unrouted ones never count."""
    metrics = Metrics(routes=["/o/"])
    unrouted, relayed = Exchange(), Exchange()
    metrics.started(unrouted)
    metrics.started(relayed)
    assert sample(samples_of(metrics), "relay_active_streams", route="/o/") == 0
    relayed.route = "/o/"
    assert sample(samples_of(metrics), "relay_active_streams", route="/o/") == 1
    assert sample(samples_of(metrics), "relay_active_streams", route="-") is None
    finished(metrics, relayed)
    finished(metrics, unrouted, 404)
    assert sample(samples_of(metrics), "relay_active_streams", route="/o/") == 0


def test_metrics_registries_are_per_instance() -> None:
    """Two apps in one process keep separate series (no global registry)."""
    first, second = Metrics(), Metrics()
    finished(first, Exchange(route="/o/"))
    assert sample(
        samples_of(first), "relay_requests_total", route="/o/", method="GET", status="200"
    )
    assert not [k for k in samples_of(second) if k[0] == "relay_requests_total"]


def test_metrics_limits_are_exported_beside_what_they_limit() -> None:
    """max_streams, the pool's size and max_downloads are gauges, so a panel or an alert can
    divide use by limit; each is exported only once its source is known."""
    metrics = Metrics(routes=["/o/"])
    s = samples_of(metrics)
    assert sample(s, "relay_max_streams") is None
    assert sample(s, "relay_upstream_max_connections") is None
    assert sample(s, "relay_max_downloads") is None

    metrics = Metrics(routes=["/o/"], max_streams=64)
    metrics.watch_pool(lambda: PoolStats(in_use=3, idle=2), limit=10)
    metrics.watch_downloads(lambda: JobCounts(queued=5, running=2), limit=2)
    s = samples_of(metrics)
    assert sample(s, "relay_max_streams") == 64
    assert sample(s, "relay_upstream_connections", state="in_use") == 3
    assert sample(s, "relay_upstream_connections", state="idle") == 2
    assert sample(s, "relay_upstream_max_connections") == 10
    assert sample(s, "relay_downloads", state="queued") == 5
    assert sample(s, "relay_downloads", state="running") == 2
    assert sample(s, "relay_max_downloads") == 2


def test_metrics_downloads_are_read_at_every_scrape() -> None:
    counts = [JobCounts(queued=1, running=0)]
    metrics = Metrics()
    metrics.watch_downloads(lambda: counts[-1], limit=4)
    assert sample(samples_of(metrics), "relay_downloads", state="queued") == 1
    counts.append(JobCounts(queued=0, running=1))
    s = samples_of(metrics)
    assert sample(s, "relay_downloads", state="queued") == 0
    assert sample(s, "relay_downloads", state="running") == 1


def scrape(relay: RelayThread) -> Samples:
    response = httpx.get(f"{relay.url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == CONTENT_TYPE_LATEST
    return parse(response.text)


@pytest.mark.e2e
def test_metrics_scrape_after_download_aborts_and_no_route(
    make_relay: Callable[..., RelayThread],
) -> None:
    """/metrics counts a download, an upstream abort, a client abort and a 404 by label."""
    relay = make_relay(resume_attempts=0)
    assert len(httpx.get(f"{relay.url}/o/gen/100000").content) == 100000
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{relay.url}/o/gen/1m?close_after=40000") as response,
    ):
        for _ in response.iter_raw():
            pass
    abort_download(relay.port, "/o/gen/64m", 64 * 1024)
    assert httpx.get(f"{relay.url}/nothing/here").status_code == 404
    assert wait_until(lambda: sample(scrape(relay), "relay_client_aborts_total", route="/o/") == 1)
    assert relay.settled()

    s = scrape(relay)
    o = {"route": "/o/"}
    assert sample(s, "relay_requests_total", route="/o/", method="GET", status="200") == 3
    assert sample(s, "relay_requests_total", route="-", method="GET", status="404") == 1
    assert sample(s, "relay_upstream_aborts_total", **o) == 1
    assert sample(s, "relay_client_aborts_total", **o) == 1
    assert sample(s, "relay_upstream_errors_total", **o) == 0
    assert sample(s, "relay_resumes_total", **o) == 0
    body = sample(s, "relay_response_body_bytes_total", **o)
    assert body is not None
    assert 100000 + 40000 + 64 * 1024 <= body < 64 * MiB
    assert sample(s, "relay_upstream_ttfb_seconds_count", **o) == 3
    assert sample(s, "relay_request_duration_seconds_count", **o) == 3
    assert sample(s, "relay_request_duration_seconds_bucket", route="/o/", le="+Inf") == 3
    assert sample(s, "relay_active_streams", **o) == 0
    assert sample(s, "relay_active_streams", route="-") is None
    assert all(
        dict(labels).get("route") in (None, "-", "/o/")
        for name, labels in s
        if name.startswith("relay_")
    )


@pytest.mark.e2e
def test_metrics_active_streams_follow_a_download_in_flight(
    make_relay: Callable[..., RelayThread],
) -> None:
    """The gauge is 1 while a download is held open and back to 0 once it is over."""
    relay = make_relay()
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        with (
            httpx.Client(timeout=30) as client,
            client.stream("GET", f"{relay.url}/o/gen/10m?stall_after=1000") as response,
        ):
            started.set()
            release.wait(20)
            response.close()

    thread = threading.Thread(target=hold, daemon=True)
    thread.start()
    try:
        assert started.wait(10)
        assert sample(scrape(relay), "relay_active_streams", route="/o/") == 1
    finally:
        release.set()
        thread.join(10)
    assert wait_until(lambda: sample(scrape(relay), "relay_active_streams", route="/o/") == 0)


@pytest.mark.e2e
def test_metrics_upstream_pool_gauge_tracks_connections(
    make_relay: Callable[..., RelayThread],
) -> None:
    """relay_upstream_connections reports in_use while a stream holds its connection."""
    from tests.e2e.test_faults import held_stream

    relay = make_relay()

    def scrape(state: str) -> float | None:
        return sample(
            parse(httpx.get(f"{relay.url}/metrics").text), "relay_upstream_connections", state=state
        )

    with held_stream(f"{relay.url}/o/gen/10m?stall_after=1000"):
        assert scrape("in_use") == 1
    assert wait_until(lambda: scrape("in_use") == 0)


@pytest.mark.e2e
def test_metrics_cache_budget_and_fills_in_flight(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """relay_cache_max_bytes is the configured budget; relay_cache_fills_in_flight counts a
    fill while it runs (a slow upstream: 8 MiB at 128 KiB/s) and is back to 0 once it stopped
    (its client left: with cache_fill_idle_timeout = 0 the fill stops at its next chunk)."""
    from tests.e2e.test_faults import held_stream

    relay = make_relay(
        cache_dir=str(tmp_path / "cache"), cache_max_bytes=64 * MiB, cache_fill_idle_timeout=0
    )

    def cache(name: str) -> float | None:
        return sample(scrape(relay), f"relay_cache_{name}")

    assert cache("max_bytes") == 64 * MiB
    assert cache("fills_in_flight") == 0
    with held_stream(f"{relay.url}/o/gen/8m?slow=128k"):
        assert wait_until(lambda: cache("fills_in_flight") == 1)
    assert wait_until(lambda: cache("fills_in_flight") == 0)
    assert cache("fills_failed_total") == 1


@pytest.mark.e2e
def test_metrics_downloads_queued_and_running(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """With max_downloads = 1 and two downloads of stalled upstreams, one runs and one waits;
    both gone once cancelled."""
    relay = make_relay(data_dir=str(tmp_path / "data"), max_downloads=1)

    def downloads(state: str) -> float | None:
        return sample(scrape(relay), "relay_downloads", state=state)

    assert sample(scrape(relay), "relay_max_downloads") == 1
    assert (downloads("queued"), downloads("running")) == (0, 0)
    jobs = [
        httpx.post(
            f"{relay.url}/downloads",
            json={"path": f"/o/gen/4m?stall_after=1000&m={n}", "name": f"f{n}"},
            timeout=10,
        ).json()["id"]
        for n in range(2)
    ]
    assert wait_until(lambda: (downloads("queued"), downloads("running")) == (1, 1))
    for job in jobs:
        assert httpx.delete(f"{relay.url}/downloads/{job}", timeout=10).status_code in (200, 204)
    assert wait_until(lambda: (downloads("queued"), downloads("running")) == (0, 0))
