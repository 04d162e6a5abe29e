"""What the cache's end-to-end tests share: a caching relay in front of the test origin, its
cache metrics, and waiting until it has settled."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from tests.harness import RelayThread, wait_until
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
