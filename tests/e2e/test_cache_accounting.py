"""What the cache's answers say about themselves, end to end: the access line (`cache`,
`bytes`, `upstream_status`, `upstream_ttfb_ms`), the metrics (`relay_cache_*` counters,
`relay_response_body_bytes_total`, `relay_upstream_ttfb_seconds`) and the `Cache-Status`
header agree on every path: hit (small, read, zero-copy), miss from a fill, stale,
revalidated, expired, stale-if-error, slices, rewritten index pages and Hub files."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import Route
from tests.e2e.caching import MakeRelay, caching_relay
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.e2e.caching import hub_relay as _cached_relay
from tests.e2e.caching import settled as _settled
from tests.e2e.test_ecosystems_cache import JSON, PAGE, _pypi_relay
from tests.ecosystems import Hub, PyPI
from tests.harness import RelayThread, running_relay, wait_until
from tests.origin import Origin

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
_ids = itertools.count(1)


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="relay.access")
    return caplog


class Asked:
    """One request through relay: its response and its access line."""

    def __init__(self, response: httpx.Response, line: dict[str, Any]) -> None:
        self.response = response
        self.line = line

    @property
    def cache_status(self) -> str:
        return str(self.response.headers.get("cache-status", ""))


def _ask(
    caplog: pytest.LogCaptureFixture,
    url: str,
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
) -> Asked:
    request_id = f"acct-{next(_ids)}"
    response = httpx.request(
        method, url, headers={**(headers or {}), "x-request-id": request_id}, timeout=30
    )

    def lines() -> list[dict[str, Any]]:
        return [
            dict(vars(r))
            for r in caplog.records
            if r.name == "relay.access" and getattr(r, "request_id", None) == request_id
        ]

    assert wait_until(lambda: len(lines()) == 1)
    return Asked(response, lines()[0])


# What each Cache-Status (RFC 9211) says, as the access line's `cache` field names it.
def _outcome_of(cache_status: str) -> str:
    parts = [p.strip() for p in cache_status.split(";")]
    if "hit" in parts:
        return "stale" if "fwd=stale" in parts else "hit"
    if "fwd=miss" in parts:
        return "miss"
    if "fwd=stale" in parts:
        return "revalidated" if "fwd-status=304" in parts else "expired"
    return "pass"


def _agrees(asked: Asked, outcome: str, *, upstream: int | None, ttfb: bool = False) -> None:
    """The header, the access line and the bytes the client got tell the same story."""
    line = asked.line
    response = asked.response
    assert _outcome_of(asked.cache_status) == outcome, asked.cache_status
    assert line["cache"] == outcome
    assert line["status"] == response.status_code
    assert line["bytes"] == len(response.content)
    assert line["upstream_status"] == upstream
    assert (line["upstream_ttfb_ms"] is not None) is ttfb
    assert line["outcome"] == "ok"


def _body_bytes_metric(relay: RelayThread, route: str) -> float:
    text = httpx.get(relay.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(f'relay_response_body_bytes_total{{route="{route}"}}'):
            return float(line.split()[-1])
    return 0.0


def _ttfb_count(relay: RelayThread, route: str) -> float:
    text = httpx.get(relay.url + "/metrics").text
    for line in text.splitlines():
        if line.startswith(f'relay_upstream_ttfb_seconds_count{{route="{route}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_whole_object_answers_are_logged_counted_and_labelled_alike(
    origin: Origin, cached: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    """A miss logs the fill's upstream status and time to first byte (it was the request the
    upstream answered); hits (zero-copy, read on the loop, a range, a HEAD, a 304) log what
    they sent and no upstream; each is counted once under the outcome it logged."""
    relay = cached()
    url = f"{relay.url}/o/gen/100k?v=301"
    small = f"{relay.url}/o/gen/1000?v=301"
    miss = _ask(access_log, url)
    _agrees(miss, "miss", upstream=200, ttfb=True)
    assert miss.cache_status == "relay; fwd=miss"
    _settled(relay)
    _agrees(_ask(access_log, url), "hit", upstream=None)
    ranged = _ask(access_log, url, headers={"range": "bytes=100-40099"})
    assert ranged.response.status_code == 206
    _agrees(ranged, "hit", upstream=None)
    assert ranged.line["bytes"] == 40000
    head = _ask(access_log, url, method="HEAD")
    _agrees(head, "hit", upstream=None)
    assert head.line["bytes"] == 0
    etag = miss.response.headers["etag"]
    not_modified = _ask(access_log, url, headers={"if-none-match": etag})
    assert not_modified.response.status_code == 304
    _agrees(not_modified, "hit", upstream=None)
    _agrees(_ask(access_log, small), "miss", upstream=200, ttfb=True)
    _settled(relay)
    small_hit = _ask(access_log, small)
    _agrees(small_hit, "hit", upstream=None)
    assert small_hit.line["bytes"] == 1000
    metrics = _cache_metrics(relay)
    assert (metrics["hits_total"], metrics["misses_total"]) == (5, 2)
    assert metrics["bytes_zero_copy_total"] == 100 * 1024 + 40000  # the sendfile hits
    assert _body_bytes_metric(relay, "/o/") == 2 * 100 * 1024 + 40000 + 2 * 1000
    assert _ttfb_count(relay, "/o/") == 2  # the two upstream requests, once each


def test_stale_answers_are_logged_as_their_cache_status_says(
    origin: Origin, cached: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    """Revalidated (304), expired (the revalidation brought a new version: logged `expired`,
    not `miss`, as its `fwd=stale` says) and stale-while-revalidate answers, each with the
    upstream response it waited for (none for stale-while-revalidate)."""
    relay = cached()
    revalidated_url = f"{relay.url}/o/gen/64k?v=302&cc=no-cache"
    _agrees(_ask(access_log, revalidated_url), "miss", upstream=200, ttfb=True)
    _settled(relay)
    revalidated = _ask(access_log, revalidated_url)
    assert revalidated.cache_status == "relay; fwd=stale; fwd-status=304"
    _agrees(revalidated, "revalidated", upstream=304, ttfb=True)
    assert revalidated.line["bytes"] == 64 * 1024

    origin.set_version("acct-expired", 1)
    expired_url = f"{relay.url}/o/gen/64k?vkey=acct-expired&cc=max-age=0"
    _agrees(_ask(access_log, expired_url), "miss", upstream=200, ttfb=True)
    _settled(relay)
    origin.set_version("acct-expired", 2)
    expired = _ask(access_log, expired_url)
    assert expired.response.headers["etag"] == '"gen-65536-v2"'
    assert expired.cache_status == "relay; fwd=stale"
    _agrees(expired, "expired", upstream=200, ttfb=True)
    _settled(relay)

    swr_url = f"{relay.url}/o/gen/64k?v=303&cc=max-age=0,stale-while-revalidate=600"
    _agrees(_ask(access_log, swr_url), "miss", upstream=200, ttfb=True)
    _settled(relay)
    swr = _ask(access_log, swr_url)
    assert swr.cache_status == 'relay; hit; fwd=stale; detail="stale-while-revalidate"'
    _agrees(swr, "stale", upstream=None)
    _settled(relay)
    metrics = _cache_metrics(relay)
    assert (metrics["revalidated_total"], metrics["expired_total"]) == (1, 1)
    assert (metrics["stale_total"], metrics["misses_total"], metrics["hits_total"]) == (1, 3, 0)


def test_stale_if_error_is_logged_stale_without_an_upstream_answer(
    cached: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    down = Origin().start()
    routes = (Route(prefix="/d/", upstream=down.url + "/", allow_private=True),)
    relay = cached(routes=routes)
    url = f"{relay.url}/d/gen/64k?v=304&cc=max-age=0,stale-if-error=600"
    _agrees(_ask(access_log, url), "miss", upstream=200, ttfb=True)
    _settled(relay)
    down.stop()
    stale = _ask(access_log, url)
    assert stale.cache_status.startswith("relay; hit; fwd=stale; fwd-status=502")
    _agrees(stale, "stale", upstream=None)
    metrics = _cache_metrics(relay)
    assert (metrics["stale_total"], metrics["hits_total"]) == (1, 0)


def test_answers_from_slices_are_logged_and_counted_once(
    origin: Origin, cached: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    """A range of a cold object is a miss from its slice's fill (the 206 it brought); the
    same range again a hit; a whole GET stitched from slices logs every byte it sent."""
    relay = cached()
    url = f"{relay.url}/o/gen/2m?v=305"
    cold = _ask(access_log, url, headers={"range": "bytes=0-99"})
    _agrees(cold, "miss", upstream=206, ttfb=True)
    _settled(relay)
    _agrees(_ask(access_log, url, headers={"range": "bytes=0-99"}), "hit", upstream=None)
    whole = _ask(access_log, url)
    assert len(whole.response.content) == 2 * MiB
    _agrees(whole, "miss", upstream=206, ttfb=True)  # slice 1 was fetched for it
    _settled(relay)
    _agrees(_ask(access_log, url), "hit", upstream=None)
    metrics = _cache_metrics(relay)
    assert (metrics["hits_total"], metrics["misses_total"]) == (2, 2)
    assert _body_bytes_metric(relay, "/o/") == 2 * 100 + 2 * 2 * MiB


@pytest.fixture
def pypi_site() -> Iterator[PyPI]:
    site = PyPI()
    with site.index, site.files_host:
        yield site


def test_rewritten_index_pages_count_the_bytes_they_sent(
    pypi_site: PyPI, tmp_path: Path, access_log: pytest.LogCaptureFixture
) -> None:
    """A rewritten page has no Content-Length: its access line and the body bytes metric
    count the rewritten bytes that went out (they were 0)."""
    with running_relay(_pypi_relay(pypi_site, tmp_path)) as relay:
        url = relay.url + "/pypi" + PAGE
        miss = _ask(access_log, url, headers={"accept": JSON})
        _settled(relay)
        hit = _ask(access_log, url, headers={"accept": JSON})
        body_bytes = _body_bytes_metric(relay, "/pypi/")
    assert "content-length" not in hit.response.headers
    _agrees(miss, "miss", upstream=200, ttfb=True)
    _agrees(hit, "hit", upstream=None)
    assert hit.line["bytes"] > 0
    assert body_bytes == len(miss.response.content) + len(hit.response.content)


@pytest.fixture
def hub_site() -> Iterator[Hub]:
    site = Hub()
    with site.hub, site.cdn:
        yield site


def test_hub_files_are_logged_as_their_cache_status_says(
    hub_site: Hub, tmp_path: Path, access_log: pytest.LogCaptureFixture
) -> None:
    url = f"/hf/{Hub.repo}/resolve/main/model.bin"
    with _cached_relay(hub_site, tmp_path) as relay:
        miss = _ask(access_log, relay.url + url)
        _settled(relay)
        hit = _ask(access_log, relay.url + url)
        ranged = _ask(access_log, relay.url + url, headers={"range": "bytes=10-19"})
    _agrees(miss, "miss", upstream=200, ttfb=True)
    _agrees(hit, "hit", upstream=None)
    _agrees(ranged, "hit", upstream=None)
    assert ranged.line["bytes"] == 10
