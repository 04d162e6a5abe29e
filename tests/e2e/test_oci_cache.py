"""relay's oci route with its cache against the real registry, upstream faults made by the
fault proxy in front of it (tests/oci_world.py; issue 17): coalesced cold pulls, tags that
move, stale tags when the upstream is down or rate-limited, cut layers resumed, tampered
layers never handed over whole."""

from __future__ import annotations

import hashlib
import itertools
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from relay.cache.clock import ManualClock
from tests.harness import wait_until
from tests.oci_clients import skopeo_copy, skopeo_inspect
from tests.oci_fault_proxy import Fault, FaultProxy
from tests.oci_image import INDEX, MANIFEST, Image
from tests.oci_upstream import Registry, push_layout
from tests.oci_world import ROUTE_PREFIX, OciLayoutFixture, needs, oci_relay

pytestmark = pytest.mark.e2e

FRESH = 60.0
_repos = itertools.count(1)


def _ref(port: int, name: str) -> str:
    return f"127.0.0.1:{port}/{ROUTE_PREFIX}/{name}"


@needs("docker-registry", "skopeo")
def test_concurrent_cold_pulls_cost_the_upstream_one_fetch_per_blob(
    oci_big: Image, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    """Three skopeo pulls of an image with a 256 MiB layer, started while the upstream holds
    its blobs: every client gets the image (digests checked), the upstream sends each blob
    once."""
    clients = 3
    fault_proxy.hold("/blobs/")
    with (
        oci_relay(fault_proxy.url, oci_tmp / "cache") as relay,
        ThreadPoolExecutor(clients) as pool,
    ):
        pulls = [
            pool.submit(
                skopeo_copy,
                _ref(relay.port, "big:v1"),
                oci_tmp / f"out{i}",
                workdir=oci_tmp / f"skopeo{i}",
            )
            for i in range(clients)
        ]
        # Every client asked for the manifest, and relay's one fill of a blob is held.
        assert fault_proxy.wait_for(lambda p: p.count("GET", "/blobs/") >= 1)
        assert wait_until(lambda: relay.streams_active() >= clients, timeout=30)
        fault_proxy.release()
        assert [f.result(timeout=300) for f in pulls] == [oci_big.top.digest] * clients
    for blob in oci_big.blobs():
        assert fault_proxy.count("GET", "/blobs/" + blob.digest) == 1, blob
    assert fault_proxy.body_bytes <= oci_big.size + 64 * 1024


@needs("docker-registry", "skopeo")
def test_a_tag_moved_upstream_is_seen_after_its_freshness_and_an_unchanged_one_costs_a_head(
    oci_layout: OciLayoutFixture, oci_registry: Registry, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    name = f"moving/t{next(_repos)}"
    layout, pusher = oci_layout.layout.path, oci_layout.workdir
    push_layout(layout, "v1", oci_registry.host, name, dest_tag="latest", workdir=pusher)
    clock = ManualClock()
    with oci_relay(fault_proxy.url, oci_tmp / "cache", clock=clock, tag_max_age=FRESH) as relay:
        ref = _ref(relay.port, f"{name}:latest")
        tag = f"/{name}/manifests/latest"

        def digest() -> str:
            found: str = skopeo_inspect(ref, workdir=oci_tmp)["Digest"]
            return found

        assert digest() == oci_layout.v1.top.digest
        manifest_gets = fault_proxy.count("GET", "/manifests/")

        clock.advance(FRESH + 1)  # stale, unchanged upstream: a HEAD, no GET
        heads = fault_proxy.count("HEAD", tag)
        assert digest() == oci_layout.v1.top.digest
        assert fault_proxy.count("HEAD", tag) == heads + 1
        assert fault_proxy.count("GET", "/manifests/") == manifest_gets

        push_layout(layout, "v2", oci_registry.host, name, dest_tag="latest", workdir=pusher)
        assert digest() == oci_layout.v1.top.digest  # still fresh: upstream not asked
        assert fault_proxy.count("HEAD", tag) == heads + 1

        clock.advance(FRESH + 1)
        assert digest() == oci_layout.v2.top.digest
        assert fault_proxy.count("GET", "/manifests/" + oci_layout.v2.top.digest) == 1
        out = oci_tmp / "out"
        assert skopeo_copy(ref, out, workdir=oci_tmp, all_platforms=True) == (
            oci_layout.v2.top.digest
        )


@needs("docker-registry", "skopeo")
def test_a_stored_tag_still_pulls_when_the_upstream_answers_429_and_when_it_is_down(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    clock = ManualClock()
    v1 = oci_layout.v1
    with oci_relay(fault_proxy.url, oci_tmp / "cache", clock=clock, tag_max_age=FRESH) as relay:
        ref = _ref(relay.port, "small:v1")
        tag_url = f"{relay.url}/v2/{ROUTE_PREFIX}/small/manifests/v1"
        assert skopeo_copy(ref, oci_tmp / "a", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
        # A tag is stored per Accept (an index and a single manifest are different answers):
        # this one too, to read its Cache-Status below.
        assert httpx.get(tag_url, headers={"Accept": INDEX}).status_code == 200
        clock.advance(FRESH + 1)
        for method in ("HEAD", "GET"):
            fault_proxy.add_fault(Fault("/manifests/", method=method, status=429, times=0))
        assert skopeo_copy(ref, oci_tmp / "b", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
        assert fault_proxy.count("HEAD", "/small/manifests/v1") >= 1
        stale = httpx.get(tag_url, headers={"Accept": INDEX})
        assert stale.status_code == 200
        assert stale.headers["docker-content-digest"] == v1.top.digest
        assert "fwd-status=429" in stale.headers["cache-status"]

        fault_proxy.stop()
        clock.advance(FRESH + 1)
        assert skopeo_copy(ref, oci_tmp / "c", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
        # A tag relay never saw cannot be made up: a registry error, not a 500.
        unknown = httpx.get(
            f"{relay.url}/v2/{ROUTE_PREFIX}/small/manifests/v2", headers={"Accept": INDEX}
        )
        assert unknown.status_code in (502, 503, 504)
        assert unknown.json()["errors"]


@needs("docker-registry", "skopeo")
def test_a_stored_tag_still_pulls_after_a_restart_with_the_upstream_down(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    """Tags' answers are kept in the cache: skopeo pulls a tag through a relay restarted on
    the same cache_dir while the upstream is down, and the tag's Cache-Status says stale."""
    v1 = oci_layout.v1
    cache = oci_tmp / "cache"
    with oci_relay(fault_proxy.url, cache, tag_max_age=FRESH) as relay:
        ref = _ref(relay.port, "small:v1")
        assert skopeo_copy(ref, oci_tmp / "a", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
        tag_url = f"{relay.url}/v2/{ROUTE_PREFIX}/small/manifests/v1"
        assert httpx.get(tag_url, headers={"Accept": INDEX}).status_code == 200
    fault_proxy.stop()
    clock = ManualClock(now=ManualClock().now() + 10**8)  # every tag long stale
    with oci_relay(fault_proxy.url, cache, clock=clock, tag_max_age=FRESH) as relay:
        ref = _ref(relay.port, "small:v1")
        assert skopeo_copy(ref, oci_tmp / "b", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
        stale = httpx.get(
            f"{relay.url}/v2/{ROUTE_PREFIX}/small/manifests/v1", headers={"Accept": INDEX}
        )
    assert stale.status_code == 200
    assert stale.headers["docker-content-digest"] == v1.top.digest
    assert 'detail="stale-if-error"' in stale.headers["cache-status"]


@needs("docker-registry", "skopeo")
def test_an_upstream_cut_in_the_middle_of_a_layer_is_resumed(
    oci_big: Image, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    layer = oci_big.layers["amd64"][0]
    cut = 100 * 1024 * 1024
    fault_proxy.add_fault(Fault("/blobs/" + layer.digest, cut_after=cut))
    with oci_relay(fault_proxy.url, oci_tmp / "cache") as relay:
        digest = skopeo_copy(_ref(relay.port, "big:v1"), oci_tmp / "out", workdir=oci_tmp)
    assert digest == oci_big.top.digest
    gets = [r for r in fault_proxy.records if r.method == "GET" and layer.digest in r.path]
    assert len(gets) == 2
    assert "range" not in gets[0].headers
    assert gets[1].headers["range"].startswith("bytes=")
    resumed_at = int(gets[1].headers["range"].removeprefix("bytes=").split("-")[0])
    assert 0 < resumed_at <= cut
    assert fault_proxy.body_bytes <= oci_big.size + 64 * 1024  # resumed, not fetched again


@needs("docker-registry", "skopeo")
def test_a_tampered_layer_never_reaches_a_client_as_complete(
    oci_big: Image, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    """The upstream flips one byte ten bytes before the end of the 256 MiB layer: a client
    streaming it gets its transfer aborted (never the whole body), and nothing is stored:
    once the upstream is right again, skopeo's pull succeeds."""
    layer = oci_big.layers["amd64"][0]
    fault_proxy.add_fault(Fault("/blobs/" + layer.digest, tamper_at=layer.size - 10, times=0))
    with oci_relay(fault_proxy.url, oci_tmp / "cache") as relay:
        url = f"{relay.url}/v2/{ROUTE_PREFIX}/big/blobs/{layer.digest}"
        received = 0
        sha = hashlib.sha256()
        complete = False
        try:
            with httpx.stream("GET", url, timeout=120) as response:
                for chunk in response.iter_raw(1 << 20):
                    received += len(chunk)
                    sha.update(chunk)
                complete = response.status_code == 200
        except httpx.HTTPError:
            pass
        assert not (complete and received == layer.size), "a tampered layer was handed over"
        assert received < layer.size  # the last bytes are held until the digest matched
        fault_proxy.clear_faults()
        digest = skopeo_copy(_ref(relay.port, "big:v1"), oci_tmp / "good", workdir=oci_tmp)
        assert digest == oci_big.top.digest


@needs("docker-registry")
def test_blobs_are_shared_across_repositories_and_ranges_answered_from_what_is_held(
    oci_layout: OciLayoutFixture, oci_registry: Registry, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    name = f"copy/t{next(_repos)}"
    push_layout(oci_layout.layout.path, "v1", oci_registry.host, name, workdir=oci_layout.workdir)
    layer = oci_layout.v1.layers["amd64"][1]
    with oci_relay(fault_proxy.url, oci_tmp / "cache") as relay:
        base = f"{relay.url}/v2/{ROUTE_PREFIX}"
        whole = httpx.get(f"{base}/small/blobs/{layer.digest}")
        assert whole.status_code == 200
        assert "sha256:" + hashlib.sha256(whole.content).hexdigest() == layer.digest
        other = httpx.get(f"{base}/{name}/blobs/{layer.digest}")
        assert other.content == whole.content
        part = httpx.get(f"{base}/{name}/blobs/{layer.digest}", headers={"Range": "bytes=100-"})
        assert part.status_code == 206
        assert part.content == whole.content[100:]
        manifest = httpx.get(
            f"{base}/{name}/manifests/{oci_layout.v1.manifests['amd64'].digest}",
            headers={"Accept": MANIFEST},
        )
        assert manifest.status_code == 200
    assert fault_proxy.count("GET", "/blobs/" + layer.digest) == 1
