"""What the cache's end-to-end tests share: a caching relay in front of the test origin, its
cache metrics, and waiting until it has settled."""

from __future__ import annotations

import contextlib
import fnmatch
import os
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
    hub: Hub,
    tmp_path: Path,
    admin_token: str = "",
    settings: dict[str, Any] | None = None,
    **route: Any,
) -> contextlib.AbstractContextManager[RelayThread]:
    """A relay caching an `hf` route to the fake Hub (its redirects to the CDN followed);
    `settings`: config overrides; extra keyword arguments are the route's."""
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
        **(settings or {}),
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


def _cache_files(root: Path, pattern: str) -> list[Path]:
    """The files matching `pattern` under `root`/objects; directories the relay removes while
    this walks them (a purge, an eviction) are skipped, not an error."""
    found: list[Path] = []
    for top, _dirs, names in os.walk(root / "objects"):
        found.extend(Path(top) / n for n in names if fnmatch.fnmatch(n, pattern))
    return sorted(found)


def data_files(root: Path) -> list[Path]:
    """The stored versions' data files under cache_dir `root` (partial files of fills too)."""
    return [p for p in _cache_files(root, "*") if p.suffix in (".data", ".partial")]


def stored_data(root: Path) -> list[Path]:
    """The data files of published versions under cache_dir `root`."""
    return _cache_files(root, "*.data")


def meta_files(root: Path) -> list[Path]:
    """The stored versions' records under cache_dir `root`."""
    return _cache_files(root, "*.meta")


def partial_files(root: Path) -> list[Path]:
    """The partial files of fills under cache_dir `root`."""
    return _cache_files(root, "*.partial")


def disk_use(root: Path) -> tuple[int, list[Path]]:
    """What the tree at `root` takes on disk (st_blocks of every file and directory, `root`
    included) and its directories."""
    used = 0
    directories: list[Path] = []
    for here, _, names in os.walk(root):
        directories.append(Path(here))
        for path in [here, *(os.path.join(here, n) for n in names)]:
            used += os.lstat(path).st_blocks * 512
    return used, directories


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
