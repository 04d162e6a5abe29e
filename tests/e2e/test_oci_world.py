"""The OCI test kit itself, without relay: the real registry, the image written offline, the
clients and the fault proxy work together (tests/oci_world.py). If these fail, the relay
tests in test_oci_*.py cannot say anything."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.oci_clients import Containerd, podman_pull, skopeo_copy, skopeo_inspect
from tests.oci_fault_proxy import Fault, FaultProxy
from tests.oci_image import INDEX
from tests.oci_upstream import Registry
from tests.oci_world import PULLER, OciLayoutFixture, TokenWorld, needs

pytestmark = pytest.mark.e2e


@needs("docker-registry", "skopeo")
def test_an_image_written_offline_is_pushed_and_pulled_back_with_skopeo(
    oci_layout: OciLayoutFixture, oci_registry: Registry, oci_tmp: Path
) -> None:
    v1 = oci_layout.v1
    ref = f"{oci_registry.host}/small:v1"
    raw = skopeo_inspect(ref, workdir=oci_tmp, raw=True)
    assert raw["mediaType"] == INDEX
    assert {m["digest"] for m in raw["manifests"]} == {b.digest for b in v1.manifests.values()}
    digest = skopeo_copy(ref, oci_tmp / "out", workdir=oci_tmp, all_platforms=True)
    assert digest == v1.top.digest
    for blob in v1.blobs():
        stored = oci_tmp / "out" / "blobs" / "sha256" / blob.digest.removeprefix("sha256:")
        assert stored.stat().st_size == blob.size


@needs("docker-registry", "skopeo")
def test_the_fault_proxy_forwards_counts_cuts_tampers_and_refuses(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy
) -> None:
    layer = oci_layout.v1.layers["amd64"][1]
    url = f"{fault_proxy.url}/v2/small/blobs/{layer.digest}"
    headers = {"Authorization": "Bearer seen"}
    assert httpx.get(url, headers=headers).content.__len__() == layer.size
    assert fault_proxy.count("GET", layer.digest) == 1
    assert fault_proxy.authorizations() == ["Bearer seen"]

    fault_proxy.add_fault(Fault(layer.digest, cut_after=1000))
    with pytest.raises(httpx.RemoteProtocolError), httpx.stream("GET", url) as response:
        response.read()
    fault_proxy.add_fault(Fault(layer.digest, tamper_at=10))
    tampered = httpx.get(url).content
    assert len(tampered) == layer.size
    assert tampered != httpx.get(url).content
    fault_proxy.add_fault(Fault("/manifests/", status=429, times=0))
    assert httpx.get(f"{fault_proxy.url}/v2/small/manifests/v1").status_code == 429
    fault_proxy.clear_faults()
    accept = {"Accept": INDEX}
    assert httpx.head(f"{fault_proxy.url}/v2/small/manifests/v1", headers=accept).status_code == 200
    ranged = httpx.get(url, headers={"Range": "bytes=100-"})
    assert ranged.status_code == 206
    assert len(ranged.content) == layer.size - 100

    fault_proxy.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url)


@needs("docker-registry", "skopeo")
def test_the_token_registry_trusts_the_issuer(oci_token_world: TokenWorld, oci_tmp: Path) -> None:
    registry, issuer = oci_token_world.registry, oci_token_world.issuer
    issuer.reset()  # the session's issuer: earlier tests (test_oci_auth) asked it too
    challenge = httpx.get(f"{registry.url}/v2/small/manifests/v1")
    assert challenge.status_code == 401
    assert issuer.realm in challenge.headers["www-authenticate"]
    raw = skopeo_inspect(f"{registry.host}/small:v1", workdir=oci_tmp, raw=True, creds=PULLER)
    assert raw["mediaType"] == INDEX
    assert [r.account for r in issuer.requests] == ["puller"]


@needs("docker-registry", "podman")
def test_podman_pulls_through_a_registries_conf_mirror(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    digest = podman_pull("small:v1", fault_proxy.host, workdir=oci_tmp)
    assert digest == oci_layout.v1.top.digest
    assert fault_proxy.count("GET", oci_layout.v1.layers["amd64"][1].digest) == 1


@needs("docker-registry", "containerd", "ctr")
def test_containerd_pulls_through_a_hosts_toml_mirror_with_ns(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    with Containerd(oci_tmp / "containerd") as containerd:
        digest = containerd.pull("small:v1", fault_proxy.url)
    assert digest == oci_layout.v1.top.digest
    manifests = [r for r in fault_proxy.records if "/manifests/" in r.path]
    assert manifests
    assert all(r.query == "ns=registry.test" for r in manifests)


@needs("docker-registry", "skopeo")
def test_a_proxy_mode_registry_pulls_through_the_fault_proxy(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    """The bench's other side: distribution as a pull-through cache of the same upstream."""
    with Registry(oci_tmp / "registry-proxy", proxy_remote=fault_proxy.url) as mirror:
        digest = skopeo_copy(f"{mirror.host}/small:v1", oci_tmp / "out", workdir=oci_tmp)
    assert digest == oci_layout.v1.manifests["amd64"].digest
    layer = oci_layout.v1.layers["amd64"][1].digest
    # distribution 2.8 fetched this layer twice (HEAD, GET, GET) for this one pull.
    assert fault_proxy.count("GET", layer) >= 1
