"""The registry mirror with real clients (skopeo, podman, containerd) and the real CNCF
registry, through the oci-world kit (tests/oci_world.py): a relay's oci route in front of the
kit's registry (behind its fault proxy, which counts), each client configured the way its
users configure a mirror."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from relay.config import Route
from tests.harness import RelayThread, relay_config, running_relay
from tests.oci_clients import UPSTREAM_NAME, Containerd, podman_pull, skopeo_copy
from tests.oci_fault_proxy import FaultProxy
from tests.oci_upstream import Registry
from tests.oci_world import PULLER, OciLayoutFixture, TokenWorld, needs

pytestmark = pytest.mark.e2e


def _relay(upstream: str, tmp_path: Path) -> contextlib.AbstractContextManager[RelayThread]:
    oci = Route(
        prefix="/kit/",
        upstream=upstream,
        preset="oci",
        allow_private=True,
        registry_hosts=(UPSTREAM_NAME,),
        redirect_hosts=("127.0.0.1",),
    )
    config = relay_config(
        upstream,
        routes=(oci,),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=512 * 1024 * 1024,
    )
    return running_relay(config)


def _host(relay: RelayThread) -> str:
    return relay.url.removeprefix("http://")


@needs("docker-registry", "skopeo")
def test_skopeo_copies_all_platforms_through_relay_once_per_blob(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path, tmp_path: Path
) -> None:
    v1 = oci_layout.v1
    with _relay(fault_proxy.url, tmp_path) as relay:
        for n in range(2):
            digest = skopeo_copy(
                f"{_host(relay)}/kit/small:v1",
                oci_tmp / f"out{n}",
                workdir=oci_tmp,
                all_platforms=True,
            )
            assert digest == v1.top.digest
        relay.check_invariants()
    for blob in v1.blobs():
        assert fault_proxy.count("GET", blob.digest) <= 1, blob.digest


@needs("docker-registry", "podman")
def test_podman_pulls_through_relay_as_a_registries_conf_mirror(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path, tmp_path: Path
) -> None:
    with _relay(fault_proxy.url, tmp_path) as relay:
        digest = podman_pull("small:v1", f"{_host(relay)}/kit", workdir=oci_tmp)
        relay.check_invariants()
    assert digest == oci_layout.v1.top.digest


@needs("docker-registry", "containerd", "ctr")
def test_containerd_pulls_through_relay_as_a_hosts_toml_mirror(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path, tmp_path: Path
) -> None:
    with _relay(fault_proxy.url, tmp_path) as relay, Containerd(oci_tmp / "ctrd") as containerd:
        digest = containerd.pull("small:v1", relay.url)
        relay.check_invariants()
    assert digest == oci_layout.v1.top.digest


@needs("docker-registry", "skopeo")
def test_relay_does_the_token_dance_with_its_own_credentials(
    oci_layout: OciLayoutFixture, oci_token_world: TokenWorld, oci_tmp: Path, tmp_path: Path
) -> None:
    registry: Registry = oci_token_world.registry
    issuer = oci_token_world.issuer
    issuer.reset()
    env = {"KIT_USER": PULLER[0], "KIT_PASS": PULLER[1]}
    oci = Route(
        prefix="/kit/",
        upstream=registry.url,
        preset="oci",
        allow_private=True,
        registry_hosts=(UPSTREAM_NAME,),
        username_env="KIT_USER",
        password_env="KIT_PASS",
    ).resolve_credential(env)
    config = relay_config(registry.url, routes=(oci,))
    with running_relay(config) as relay:
        digest = skopeo_copy(
            f"{_host(relay)}/kit/small:v1", oci_tmp / "out", workdir=oci_tmp, all_platforms=True
        )
        relay.check_invariants()
    assert digest == oci_layout.v1.top.digest
    assert issuer.requests
    assert {r.account for r in issuer.requests} == {"puller"}
