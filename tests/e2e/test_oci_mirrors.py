"""An oci route over two real registries (`upstreams`): an anonymous `docker-registry` and a
token-auth one holding the same image, each its own registry to relay (its own realm,
credentials and tokens). skopeo pulls through relay while the first is down, and a layer cut on
the first is finished from the second with the second's token, verified by its digest; neither
registry ever sees the other's credentials (tests/oci_world.py; issues 17 and 18)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import Mirror
from tests.oci_clients import skopeo_copy
from tests.oci_fault_proxy import Fault, FaultProxy
from tests.oci_world import PULLER, ROUTE_PREFIX, OciLayoutFixture, TokenWorld, needs, oci_relay

pytestmark = pytest.mark.e2e

ENVIRON = {"B_USER": PULLER[0], "B_PASSWORD": PULLER[1]}
PULLER_BASIC = "Basic " + base64.b64encode(f"{PULLER[0]}:{PULLER[1]}".encode()).decode()


def _mirrors(first: str, second: str) -> dict[str, Any]:
    """The route's keys: `first` anonymous, then `second` with relay's account there."""
    return {
        "upstreams": (
            Mirror(url=first),
            Mirror(url=second, username_env="B_USER", password_env="B_PASSWORD"),
        ),
        "failover": "any",
    }


@needs("docker-registry", "skopeo")
def test_skopeo_pulls_from_the_second_registry_with_its_own_token_while_the_first_is_down(
    oci_layout: OciLayoutFixture,
    oci_token_world: TokenWorld,
    token_proxy: FaultProxy,
    fault_proxy: FaultProxy,
    oci_tmp: Path,
) -> None:
    down = fault_proxy.url
    fault_proxy.stop()  # connections refused
    with oci_relay(
        down, oci_tmp / "cache", environ=ENVIRON, **_mirrors(down, token_proxy.url)
    ) as relay:
        ref = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}/small:v1"
        digest = skopeo_copy(ref, oci_tmp / "a", workdir=oci_tmp, all_platforms=True)
        assert digest == oci_layout.v1.top.digest
        metrics = httpx.get(f"{relay.url}/metrics").text
    fell = [
        line
        for line in metrics.splitlines()
        if line.startswith("relay_upstream_mirror_fall_throughs_total{") and 'mirror="1"' in line
    ]
    assert fell
    assert float(fell[0].rsplit(" ", 1)[1]) >= 1
    issued = oci_token_world.issuer.requests
    assert issued
    assert {r.authorization for r in issued} == {PULLER_BASIC}
    seen = token_proxy.authorizations()
    assert seen
    assert all(v.startswith("Bearer ey") for v in seen), seen


@needs("docker-registry", "skopeo")
@pytest.mark.parametrize("cached", [True, False])
def test_a_layer_cut_on_one_registry_is_finished_from_the_other_with_its_own_token(
    oci_layout: OciLayoutFixture,
    oci_token_world: TokenWorld,
    token_proxy: FaultProxy,
    fault_proxy: FaultProxy,
    oci_tmp: Path,
    cached: bool,
) -> None:
    v1 = oci_layout.v1
    layer = v1.layers["amd64"][1]
    cut = layer.size // 2
    fault_proxy.add_fault(Fault("/blobs/" + layer.digest, cut_after=cut))
    cache = oci_tmp / "cache" if cached else None
    with oci_relay(
        fault_proxy.url, cache, environ=ENVIRON, **_mirrors(fault_proxy.url, token_proxy.url)
    ) as relay:
        url = f"{relay.url}/v2/{ROUTE_PREFIX}/small/blobs/{layer.digest}"
        out = oci_tmp / "layer"
        with httpx.stream("GET", url) as response, out.open("wb") as fh:
            assert response.status_code == 200
            for chunk in response.iter_raw():
                fh.write(chunk)
        assert out.stat().st_size == layer.size
        assert "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest() == layer.digest
        ref = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}/small:v1"
        assert skopeo_copy(ref, oci_tmp / "a", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
    first = [r for r in fault_proxy.records if r.method == "GET" and layer.digest in r.path]
    rest = [r for r in token_proxy.records if r.method == "GET" and layer.digest in r.path]
    assert first
    assert "range" not in first[0].headers
    finished = [r for r in rest if r.headers.get("range", "").startswith("bytes=")]
    assert finished, [r.headers for r in rest]
    start = int(finished[0].headers["range"].removeprefix("bytes=").split("-")[0])
    assert 0 < start <= cut
    assert "if-range" not in finished[0].headers  # validators are not compared across mirrors
    # Each registry saw its own credentials only: the anonymous one none at all.
    assert fault_proxy.authorizations() == []
    assert all(v.startswith("Bearer ey") for v in token_proxy.authorizations())
