"""The real container clients pull through relay's `preset = "oci"` from the real registry, and
each verifies every digest itself (tests/oci_world.py; issue 17)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.oci_clients import (
    UPSTREAM_NAME,
    Containerd,
    podman_pull,
    skopeo_copy,
    skopeo_inspect,
    skopeo_list_tags,
)
from tests.oci_fault_proxy import FaultProxy
from tests.oci_image import INDEX, MANIFEST
from tests.oci_world import ROUTE_PREFIX, OciLayoutFixture, needs, oci_relay

pytestmark = pytest.mark.e2e


@needs("docker-registry", "skopeo", "podman", "containerd", "ctr")
def test_skopeo_podman_and_containerd_pull_through_relay_and_each_blob_is_fetched_once(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    """skopeo by relay's name prefix, podman through a registries.conf mirror with a path,
    containerd through a hosts.toml mirror (`ns=registry.test`): every client gets the image
    its tag names, digests checked by the client, and the upstream is asked for each blob
    once, whichever client, repository addressing or platform list asked first."""
    v1 = oci_layout.v1
    with oci_relay(fault_proxy.url, oci_tmp / "cache") as relay:
        ref = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}/small:v1"
        inspected = skopeo_inspect(ref, workdir=oci_tmp / "skopeo")
        assert inspected["Digest"] == v1.top.digest
        raw = skopeo_inspect(ref, workdir=oci_tmp / "skopeo", raw=True)
        assert raw["mediaType"] == INDEX
        out = oci_tmp / "skopeo-out"
        assert skopeo_copy(ref, out, workdir=oci_tmp / "skopeo", all_platforms=True) == (
            v1.top.digest
        )
        for blob in v1.blobs():
            path = out / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
            assert path.stat().st_size == blob.size

        repo = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}/small"
        assert set(skopeo_list_tags(repo, workdir=oci_tmp / "skopeo")) >= {"v1", "v2"}

        mirror = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}"
        assert podman_pull("small:v1", mirror, workdir=oci_tmp / "podman") == v1.top.digest

        with Containerd(oci_tmp / "containerd") as containerd:
            assert containerd.pull("small:v1", relay.url) == v1.top.digest

        for blob in v1.blobs():
            assert fault_proxy.count("GET", "/blobs/" + blob.digest) == 1, blob
        # Each manifest (the index, two platforms') fetched once by digest; the tag checked
        # with a HEAD (no GET against rate limits), once per Accept a client sends (skopeo
        # and podman share one; containerd's has `*/*`), then answered fresh.
        for manifest in [v1.top, *v1.manifests.values()]:
            assert fault_proxy.count("GET", "/manifests/" + manifest.digest) <= 1
        tag = [r for r in fault_proxy.records if r.path.endswith("/manifests/v1")]
        assert {r.method for r in tag} == {"HEAD"}
        assert len(tag) <= 2
        assert fault_proxy.count("GET", "/manifests/") <= 3


@needs("docker-registry")
def test_a_manifest_by_tag_and_by_digest_has_the_registry_headers_on_get_and_head(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    v1 = oci_layout.v1
    amd64 = v1.manifests["amd64"]
    with oci_relay(fault_proxy.url, oci_tmp / "cache") as relay:
        base = f"{relay.url}/v2/{ROUTE_PREFIX}/small"
        direct = f"{fault_proxy.url}/v2/small"
        # What the registry answers for each Accept, relay answers alike (twice: the second
        # from what it holds), on GET and HEAD.
        for accept in (INDEX, f"{MANIFEST}, {INDEX}", MANIFEST):
            want = httpx.get(f"{direct}/manifests/v1", headers={"Accept": accept})
            for method in ("GET", "HEAD", "GET", "HEAD"):
                got = httpx.request(method, f"{base}/manifests/v1", headers={"Accept": accept})
                assert got.status_code == want.status_code, (accept, method, got.text)
                if want.status_code != 200:
                    continue
                for name in ("docker-content-digest", "content-type", "content-length"):
                    assert got.headers[name] == want.headers[name], (accept, method, name)
                if method == "GET":
                    assert got.content == want.content
        assert (
            httpx.head(f"{base}/manifests/v1", headers={"Accept": INDEX}).headers[
                "docker-content-digest"
            ]
            == v1.top.digest
        )
        by_digest = httpx.get(f"{base}/manifests/{amd64.digest}", headers={"Accept": MANIFEST})
        assert by_digest.status_code == 200
        assert by_digest.headers["docker-content-digest"] == amd64.digest
        assert len(by_digest.content) == amd64.size
        ns = httpx.get(
            f"{relay.url}/v2/small/manifests/{amd64.digest}",
            params={"ns": UPSTREAM_NAME},
            headers={"Accept": MANIFEST},
        )
        assert ns.content == by_digest.content
        assert httpx.get(f"{relay.url}/v2/").headers["docker-distribution-api-version"] == (
            "registry/2.0"
        )
        missing = httpx.get(f"{base}/manifests/nosuchtag", headers={"Accept": INDEX})
        assert missing.status_code == 404
        assert missing.json()["errors"][0]["code"] == "MANIFEST_UNKNOWN"
        absent = "sha256:" + "0" * 64
        assert httpx.get(f"{base}/blobs/{absent}").status_code == 404
        push = httpx.post(f"{base}/blobs/uploads/")
        assert push.status_code in (401, 403, 405)
        assert push.json()["errors"][0]["code"]
