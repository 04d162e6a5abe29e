"""The registry mirror (`preset = "oci"`) end to end: a real relay under uvicorn in front of a
tiny registry on loopback (tests/fake_registry.py: registry, token realm, object storage),
real HTTP clients. The real clients (skopeo, podman, containerd) against the CNCF registry
are the oci-world kit's tests (tests/e2e/test_oci*.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import Route
from tests.fake_registry import FakeRegistry, digest_of
from tests.harness import RelayThread, relay_config, running_relay

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
LAYER = hashlib.sha256(b"layer").digest() * (4 * MiB // 32)  # 4 MiB
ACCEPT = {"accept": "application/vnd.oci.image.manifest.v1+json"}


@pytest.fixture
def registry() -> Iterator[FakeRegistry]:
    with FakeRegistry() as fake:
        yield fake


def _relay(
    registry: FakeRegistry, tmp_path: Path, **route: Any
) -> contextlib.AbstractContextManager[RelayThread]:
    oci = Route(
        prefix="/fake/",
        upstream=registry.registry.url,
        preset="oci",
        allow_private=True,
        registry_default=True,
        redirect_hosts=("127.0.0.1",),
        **route,
    )
    config = relay_config(
        registry.registry.url,
        routes=(oci,),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=256 * MiB,
        cache_slice_bytes=1 * MiB,
    )
    return running_relay(config)


def _storage_gets(registry: FakeRegistry, digest: str) -> list[dict[str, str]]:
    """The headers of object storage's GETs of one blob."""
    storage = registry.storage
    return [
        headers
        for (method, path, _), headers in zip(storage.requests, storage.headers, strict=True)
        if method == "GET" and digest in path
    ]


def test_concurrent_cold_pulls_cost_the_upstream_one_fetch_per_blob(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    manifest, layer = registry.add_image("library/app", "1", LAYER)
    with _relay(registry, tmp_path) as relay:

        def pull(i: int) -> tuple[str, str]:
            with httpx.Client(base_url=relay.url, timeout=60) as client:
                answer = client.get("/v2/library/app/manifests/1", headers=ACCEPT)
                assert answer.status_code == 200
                blob = client.get(f"/v2/library/app/blobs/{layer}")
                assert blob.status_code == 200
                return answer.headers["docker-content-digest"], digest_of(blob.content)

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(pull, range(8)))
        relay.check_invariants()
    assert results == [(manifest, layer)] * 8
    assert registry.storage_gets(layer) == 1


def test_a_layer_cut_mid_body_is_resumed(registry: FakeRegistry, tmp_path: Path) -> None:
    _, layer = registry.add_image("library/app", "1", LAYER)
    registry.cut_once.add(layer)
    with _relay(registry, tmp_path) as relay:
        blob = httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        again = httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    assert blob.status_code == 200
    assert digest_of(blob.content) == layer
    assert again.headers["cache-status"].startswith("relay; hit")
    assert any(r.startswith("bytes=") for r in registry.storage.ranges)


@pytest.mark.parametrize("cache", [True, False])
def test_a_layer_without_validators_cut_mid_body_is_resumed_by_its_digest(
    registry: FakeRegistry, tmp_path: Path, cache: bool
) -> None:
    """Object storage sends no ETag nor Accept-Ranges: the layer, named by its digest, is
    resumed all the same (Range, no If-Range), byte-exact."""
    _, layer = registry.add_image("library/app", "1", LAYER)
    registry.validators = False
    registry.cut_once.add(layer)
    with _relay(registry, tmp_path, cache=cache) as relay:
        blob = httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    assert blob.status_code == 200
    assert blob.content == LAYER
    gets = _storage_gets(registry, layer)
    assert len(gets) == 2
    assert gets[1]["range"].startswith("bytes=")
    assert "if-range" not in gets[1]


@pytest.mark.parametrize("cache", [True, False])
def test_tampered_bytes_after_a_resume_never_reach_a_client_as_complete(
    registry: FakeRegistry, tmp_path: Path, cache: bool
) -> None:
    _, layer = registry.add_image("library/app", "1", LAYER)
    registry.validators = False
    registry.cut_once.add(layer)
    registry.tampered_ranges[layer] = LAYER[:-1] + b"!"
    with _relay(registry, tmp_path, cache=cache) as relay:
        with pytest.raises(httpx.TransportError):  # reset or cut: never complete
            httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    ranges = [h.get("range") for h in _storage_gets(registry, layer)]
    assert ranges[0] is None
    assert (ranges[1] or "").startswith("bytes=")  # resumed, then found not to match its digest


def test_a_slice_whose_token_expired_is_fetched_with_a_new_one_and_stored(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    """A long answer's later slice meets a 401 (the registry no longer takes relay's token):
    relay gets a new token, retries that slice once, and stores it (not relayed instead)."""
    _, layer = registry.add_image("library/app", "1", LAYER)
    url = f"/v2/library/app/blobs/{layer}"
    with _relay(registry, tmp_path) as relay, httpx.Client(base_url=relay.url) as client:
        first = client.get(url, headers={"range": "bytes=0-999"})
        tokens = set(registry.issued)
        registry.issued.clear()  # expired upstream
        later = client.get(url, headers={"range": f"bytes={3 * MiB}-{3 * MiB + 999}"})
        again = client.get(url, headers={"range": f"bytes={3 * MiB}-{3 * MiB + 999}"})
        relay.check_invariants()
    assert first.content == LAYER[:1000]
    assert later.status_code == 206
    assert later.content == LAYER[3 * MiB : 3 * MiB + 1000]
    assert later.headers["cache-status"] == "relay; fwd=miss"
    assert again.headers["cache-status"].startswith("relay; hit")
    assert registry.issued - tokens  # a new token
    assert registry.storage_gets(layer) == 2  # one per slice: none relayed


def test_without_the_cache_a_tampered_layer_asked_as_a_whole_range_is_aborted(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    _, layer = registry.add_image("library/app", "1", LAYER)
    url = f"/v2/library/app/blobs/{layer}"
    with _relay(registry, tmp_path, cache=False) as relay:
        whole = httpx.get(relay.url + url, headers={"range": "bytes=0-"}, timeout=60)
        registry.tampered[layer] = LAYER[:-1] + b"!"
        with pytest.raises(httpx.TransportError):  # reset or cut: never complete
            httpx.get(relay.url + url, headers={"range": "bytes=0-"}, timeout=60)
        relay.check_invariants()
    assert whole.status_code == 206
    assert whole.content == LAYER


def test_a_tampered_layer_never_reaches_a_client_as_complete(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    _, layer = registry.add_image("library/app", "1", LAYER)
    registry.tampered[layer] = LAYER[:-1] + b"!"
    with _relay(registry, tmp_path) as relay:
        for _ in range(2):
            with pytest.raises(httpx.TransportError):  # reset or cut: never complete
                httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    assert registry.storage_gets(layer) == 2  # nothing stored


def test_a_stored_tag_pulls_with_the_registry_stopped(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    manifest, layer = registry.add_image("library/app", "1", LAYER)
    with _relay(registry, tmp_path, tag_max_age=0.0) as relay:
        first = httpx.get(f"{relay.url}/v2/library/app/manifests/1", headers=ACCEPT)
        assert first.status_code == 200
        httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        registry.status = 429
        limited = httpx.get(f"{relay.url}/v2/library/app/manifests/1", headers=ACCEPT)
        registry.registry.__exit__(None, None, None)
        stopped = httpx.get(f"{relay.url}/v2/library/app/manifests/1", headers=ACCEPT)
        blob = httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    assert limited.status_code == 200
    assert limited.headers["cache-status"].endswith('fwd-status=429; detail="stale-if-error"')
    assert stopped.status_code == 200
    assert "stale-if-error" in stopped.headers["cache-status"]
    assert stopped.content == first.content
    assert stopped.headers["docker-content-digest"] == manifest
    assert digest_of(blob.content) == layer


def test_a_stored_tag_pulls_after_a_restart_with_the_registry_stopped(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    """The tag's answer is stored in the cache: a relay restarted on the same cache_dir
    answers it (stale, saying so) while the registry is down, and its blob from the cache."""
    manifest, layer = registry.add_image("library/app", "1", LAYER)
    with _relay(registry, tmp_path, tag_max_age=0.0) as relay:
        first = httpx.get(f"{relay.url}/v2/library/app/manifests/1", headers=ACCEPT)
        assert first.status_code == 200
        httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    registry.registry.__exit__(None, None, None)
    with _relay(registry, tmp_path, tag_max_age=0.0) as relay:
        tag = httpx.get(f"{relay.url}/v2/library/app/manifests/1", headers=ACCEPT)
        head = httpx.head(f"{relay.url}/v2/library/app/manifests/1", headers=ACCEPT)
        blob = httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", timeout=60)
        relay.check_invariants()
    assert tag.status_code == 200
    assert tag.headers["cache-status"].endswith(
        'fwd=stale; fwd-status=502; detail="stale-if-error"'
    )
    assert tag.content == first.content
    assert tag.headers["docker-content-digest"] == manifest
    assert head.headers["docker-content-digest"] == manifest
    assert head.headers["content-length"] == str(len(first.content))
    assert digest_of(blob.content) == layer


def test_client_credentials_never_reach_the_upstream(
    registry: FakeRegistry, tmp_path: Path
) -> None:
    _, layer = registry.add_image("library/app", "1", LAYER)
    with _relay(registry, tmp_path) as relay:
        secret = {"authorization": "Bearer client-secret-token", **ACCEPT}
        assert (
            httpx.get(f"{relay.url}/v2/library/app/manifests/1", headers=secret).status_code == 200
        )
        assert (
            httpx.get(f"{relay.url}/v2/library/app/blobs/{layer}", headers=secret).status_code
            == 200
        )
        relay.check_invariants()
    for site in (registry.registry, registry.realm, registry.storage):
        assert site.headers
        assert all("client-secret-token" not in h.get("authorization", "") for h in site.headers)
    assert all("authorization" not in h for h in registry.storage.headers)


def test_writes_and_bad_names_get_registry_errors(registry: FakeRegistry, tmp_path: Path) -> None:
    with _relay(registry, tmp_path) as relay:
        push = httpx.post(f"{relay.url}/v2/library/app/blobs/uploads/")
        bad = httpx.get(f"{relay.url}/v2/library/app/blobs/sha512:{'0' * 128}")
        base = httpx.get(f"{relay.url}/v2/")
        relay.check_invariants()
    assert push.status_code == 405
    assert push.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert bad.status_code == 400
    assert bad.json()["errors"][0]["code"] == "DIGEST_INVALID"
    assert base.status_code == 200
    assert base.headers["docker-distribution-api-version"] == "registry/2.0"
    assert registry.registry.requests == []
