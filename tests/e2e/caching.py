"""What the cache's end-to-end tests share: a caching relay in front of the test origin, its
cache metrics, and waiting until it has settled."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from relay.config import Route
from tests.ecosystems import Hub
from tests.harness import RelayThread, relay_config, running_relay, wait_until
from tests.origin import Origin

MiB = 1024 * 1024

MakeRelay = Callable[..., RelayThread]


def caching_relay(make_relay: MakeRelay, tmp_path: Path, **defaults: Any) -> MakeRelay:
    """Starts relays with a cache in `tmp_path` (512 MiB, 1 MiB slices unless overridden)."""

    def start(**overrides: Any) -> RelayThread:
        settings: dict[str, Any] = {
            "cache_dir": str(tmp_path / "cache"),
            "cache_max_bytes": 512 * MiB,
            "cache_slice_bytes": 1 * MiB,
            **defaults,
        }
        settings.update(overrides)
        return make_relay(**settings)

    return start


def hub_relay(
    hub: Hub, tmp_path: Path, admin_token: str = "", **route: Any
) -> contextlib.AbstractContextManager[RelayThread]:
    """A relay caching an `hf` route to the fake Hub (its redirects to the CDN followed); extra
    keyword arguments are the route's."""
    cdn = hub.cdn.url.split("//")[1].split(":")[0]
    hf: dict[str, Any] = {"redirects": "follow", "redirect_hosts": (cdn,), **route}
    routes = (
        Route(prefix="/hf/", upstream=hub.hub.url + "/", allow_private=True, preset="hf", **hf),
    )
    config = relay_config(
        hub.hub.url,
        routes=routes,
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=512 * MiB,
        cache_slice_bytes=1 * MiB,
        admin_token=admin_token,
    )
    return running_relay(config)


def cache_metrics(relay: RelayThread) -> dict[str, float]:
    """relay's `relay_cache_*` metrics, by name without that prefix."""
    text = httpx.get(relay.url + "/metrics").text
    return {
        line.split()[0].removeprefix("relay_cache_"): float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("relay_cache_")
    }


def settled(relay: RelayThread) -> None:
    """No stream slot or upstream connection held, and every fill task over (published)."""
    assert relay.settled(), "relay did not settle"
    assert wait_until(lambda: relay.stray_tasks() == []), relay.stray_tasks()


def origin_gets(origin: Origin, path: str) -> list[str]:
    return [r.target for r in origin.requests if r.path == path and r.method == "GET"]


def data_files(root: Path) -> list[Path]:
    return sorted((root / "objects").rglob("data*")) if (root / "objects").exists() else []


def aria2c(url: str, out: Path) -> bytes:
    """Download `url` to `out` with aria2c, 16 connections of 1 MiB pieces; its bytes."""
    proc = subprocess.run(
        [
            "aria2c",
            "-q",
            "-x16",
            "-s16",
            "-k1M",
            "--allow-overwrite=true",
            "--file-allocation=none",
            "-d",
            str(out.parent),
            "-o",
            out.name,
            url,
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()
