"""The real world for the OCI tests: registries, images, clients (pytest fixtures).

Registered as a plugin in tests/conftest.py, so every test can ask for:

- `oci_layout` (session): an OCI layout written offline (tests/oci_image.py) with `v1` (an
  index over linux/amd64 and linux/arm64, gzip layers) and `v2` (the same platforms, other
  bytes: what a tag moves to).
- `oci_registry` (session): an anonymous `docker-registry` holding `small:v1` and `small:v2`.
- `oci_big` (session): `big:v1` pushed to `oci_registry`, one linux/amd64 manifest with an
  uncompressed 256 MiB layer (written streaming; only tests that ask for it pay for it).
- `oci_token_world` (session): a `TokenIssuer` and a token-auth registry trusting it, holding
  `small:v1` (pushed with the issuer's user `pusher`).
- `fault_proxy` (per test): a `FaultProxy` in front of `oci_registry`, fresh counts;
  `token_proxy`, one in front of `oci_token_world`'s registry (its issuer's counts reset).
- `oci_tmp`: a per-test directory for client state (outside the worktree).

`oci_relay(upstream, cache_dir)` starts a relay (tests/harness.py `RelayThread`) with one
`preset = "oci"` route: prefix `/up/` (registries.conf mirror `127.0.0.1:<port>/up`, skopeo
`127.0.0.1:<port>/up/<name>`), registry host `registry.test` (containerd's `ns=`).

`needs(*tools)` marks a test that needs those programs: skipped, with the reason, where one
is missing (the CI script installs them: `.ci/run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from relay.cache.clock import Clock
from relay.config import Config, Route
from tests.harness import RelayThread, running_relay
from tests.oci_clients import UPSTREAM_NAME
from tests.oci_fault_proxy import FaultProxy
from tests.oci_image import Image, LayerSpec, OciLayout, Platform
from tests.oci_upstream import Registry, TokenIssuer, push_layout

BIG_LAYER = 256 * 1024 * 1024
PUSHER = ("pusher", "push-secret")
"""The token issuer's user that may push (and pull)."""
PULLER = ("puller", "pull-secret")
"""A user that may pull: relay's configured upstream credential in the token tests."""

TOOLS = ("docker-registry", "skopeo", "podman", "containerd", "ctr")


def needs(*tools: str) -> pytest.MarkDecorator:
    missing = [t for t in tools if shutil.which(t) is None]
    reason = (
        f"needs {', '.join(missing)} (apt-get install docker-registry skopeo podman containerd)"
    )
    return pytest.mark.skipif(bool(missing), reason=reason)


@dataclasses.dataclass
class OciLayoutFixture:
    layout: OciLayout
    workdir: Path

    @property
    def v1(self) -> Image:
        return self.layout.images["v1"]

    @property
    def v2(self) -> Image:
        return self.layout.images["v2"]


@dataclasses.dataclass
class TokenWorld:
    issuer: TokenIssuer
    registry: Registry


ROUTE_PREFIX = "up"


def oci_route(upstream: str, *, environ: Mapping[str, str] | None = None, **keys: Any) -> Route:
    """The tests' oci route to `upstream` (a registry's base URL); `environ` resolves
    `username_env`/`password_env`."""
    route = Route(
        prefix=f"/{ROUTE_PREFIX}/",
        upstream=upstream.rstrip("/") + "/",
        preset="oci",
        allow_private=True,
        registry_hosts=(UPSTREAM_NAME,),
        **keys,
    )
    return route.resolve_credential(environ or {})


@contextlib.contextmanager
def oci_relay(
    upstream: str,
    cache_dir: Path | None,
    *,
    clock: Clock | None = None,
    environ: Mapping[str, str] | None = None,
    **keys: Any,
) -> Iterator[RelayThread]:
    """A relay with the oci route (and the cache in `cache_dir`, unless None)."""
    config = Config(
        routes=(oci_route(upstream, environ=environ, **keys),),
        log_level="warning",
        cache_dir=str(cache_dir) if cache_dir is not None else "",
        cache_max_bytes=2 * 1024 * 1024 * 1024 if cache_dir is not None else 0,
    )
    with running_relay(config, clock=clock) as relay:
        yield relay


def _platforms(seed: int) -> list[Platform]:
    return [
        Platform(arch, layers=(LayerSpec(4096, seed=seed), LayerSpec(64 * 1024, seed=seed + n)))
        for n, arch in enumerate(("amd64", "arm64"), start=1)
    ]


def _skip_without_registry() -> None:
    if shutil.which("docker-registry") is None or shutil.which("skopeo") is None:
        pytest.skip("needs docker-registry and skopeo")


@pytest.fixture(scope="session")
def oci_layout(tmp_path_factory: pytest.TempPathFactory) -> OciLayoutFixture:
    root = tmp_path_factory.mktemp("oci-layout")
    layout = OciLayout(root / "layout")
    layout.add_image("v1", _platforms(seed=11))
    layout.add_image("v2", _platforms(seed=101))
    return OciLayoutFixture(layout, root / "skopeo")


@pytest.fixture(scope="session")
def oci_registry(
    oci_layout: OciLayoutFixture, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Registry]:
    _skip_without_registry()
    root = tmp_path_factory.mktemp("oci-registry")
    try:
        with Registry(root) as registry:
            for tag in ("v1", "v2"):
                push_layout(
                    oci_layout.layout.path, tag, registry.host, "small", workdir=oci_layout.workdir
                )
            yield registry
    finally:
        shutil.rmtree(root, ignore_errors=True)  # the big image: 256 MiB


@pytest.fixture(scope="session")
def oci_big(oci_layout: OciLayoutFixture, oci_registry: Registry) -> Image:
    big = oci_layout.layout.add_image(
        "big", [Platform("amd64", layers=(LayerSpec(BIG_LAYER, seed=3, gzip=False),))]
    )
    push_layout(
        oci_layout.layout.path,
        "big",
        oci_registry.host,
        "big",
        dest_tag="v1",
        workdir=oci_layout.workdir,
    )
    # The registry holds it now: the layout's copy is not needed again.
    for blob in big.layers["amd64"]:
        oci_layout.layout.blob_path(blob.digest).unlink()
    return big


@pytest.fixture(scope="session")
def oci_token_world(
    oci_layout: OciLayoutFixture, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TokenWorld]:
    _skip_without_registry()
    root = tmp_path_factory.mktemp("oci-token")
    users = dict([PUSHER, PULLER])
    with (
        TokenIssuer(root / "issuer", users=users) as issuer,
        Registry(root / "registry", auth=issuer) as registry,
    ):
        push_layout(
            oci_layout.layout.path,
            "v1",
            registry.host,
            "small",
            creds=PUSHER,
            workdir=oci_layout.workdir,
        )
        issuer.reset()
        yield TokenWorld(issuer, registry)


@pytest.fixture
def token_proxy(oci_token_world: TokenWorld) -> Iterator[FaultProxy]:
    """A `FaultProxy` in front of the token-auth registry, fresh counts (its issuer's too)."""
    oci_token_world.issuer.reset()
    with FaultProxy(oci_token_world.registry.url) as proxy:
        yield proxy


@pytest.fixture
def fault_proxy(oci_registry: Registry) -> Iterator[FaultProxy]:
    with FaultProxy(oci_registry.url) as proxy:
        yield proxy


@pytest.fixture
def oci_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("oci-client")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
