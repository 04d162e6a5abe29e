"""Tags' answers kept as cache records (`relay.registry.tags`, `relay.cache.records`): they
survive a restart, are counted and purged like any object, and never go back to an older
digest."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.cache.cache import Cache
from tests.registry.fake import FakeRegistry, digest_of
from tests.registry.mirror import Mirror, cached_config, oci_route

LAYER = bytes(range(256)) * 64
PATH = "/v2/library/alpine/manifests/3"
TAG_MARK = "\x00oci-tag accept="  # relay.registry.tags.TAG_MARK


def _mirror(tmp_path: Path, registry: FakeRegistry, **settings: Any) -> Mirror:
    route = oci_route(
        "/dockerhub/", registry_hosts=("docker.io",), registry_default=True, tag_max_age=60.0
    )
    return Mirror(cached_config(tmp_path, route, **settings), registry)


def _down(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("refused")


def _tag_records(mirror: Mirror) -> list[str]:
    cache: Cache = mirror.state["cache"]
    return [e.key for e in cache.index.entries() if TAG_MARK in e.key]


async def test_a_tag_survives_a_restart_and_pulls_with_the_upstream_down(
    tmp_path: Path,
) -> None:
    """The tag's answer is a record in the cache: after a restart on the same cache_dir it
    is fresh as before (no upstream request), and once stale it is answered stale when the
    upstream is unreachable."""
    registry = FakeRegistry()
    digest, _ = registry.add_image("library/alpine", "3", LAYER)
    first = _mirror(tmp_path, registry)
    async with first.running():
        pulled = await first.get(PATH)
        assert pulled.status == 200
    registry.handle = _down  # type: ignore[method-assign]
    again = _mirror(tmp_path, registry)
    async with again.running():
        fresh = await again.get(PATH)
        assert fresh.status == 200
        assert fresh.headers[b"cache-status"].startswith(b"relay; hit; ttl=")
        assert fresh.body == pulled.body
        again.clock.advance(61)
        for method in ("GET", "HEAD"):
            stale = await again.get(PATH, method=method)
            assert stale.status == 200
            assert stale.headers[b"docker-content-digest"] == digest.encode()
            assert stale.headers[b"cache-status"] == (
                b'relay; hit; fwd=stale; fwd-status=502; detail="stale-if-error"'
            )
        assert digest_of((await again.get(PATH)).body) == digest


async def test_a_moved_tag_is_never_answered_with_its_old_digest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tag that moved drops its old record before the new one is written: when that write
    fails, the tag is unknown (502 with the upstream down), never the replaced digest."""
    registry = FakeRegistry()
    registry.add_image("library/alpine", "3", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        await mirror.get(PATH)
        moved, _ = registry.add_image("library/alpine", "3", LAYER + b"v2")
        mirror.clock.advance(61)

        async def failing(*args: Any, **kwargs: Any) -> bool:
            return False

        monkeypatch.setattr("relay.registry.tags.store_record", failing)
        client = await mirror.get(PATH)
        assert client.headers[b"docker-content-digest"] == moved.encode()
        registry.handle = _down  # type: ignore[method-assign]
        after = await mirror.get(PATH)
        assert after.status == 502
        assert _tag_records(mirror) == []


async def test_a_head_answered_late_does_not_undo_a_later_ones_answer(tmp_path: Path) -> None:
    """Two checks of a stale tag whose answers cross: the HEAD sent first answers last with
    the old digest. The record keeps the digest the later-sent HEAD saw."""
    registry = FakeRegistry()
    old, _ = registry.add_image("library/alpine", "3", LAYER)
    mirror = _mirror(tmp_path, registry)
    answer = registry.handle
    async with mirror.running():
        await mirror.get(PATH)
        mirror.clock.advance(61)
        release = asyncio.Event()
        held = asyncio.Event()

        async def slow_first_head(request: httpx.Request) -> httpx.Response:
            if request.method == "HEAD" and not held.is_set():
                response = answer(request)  # the old digest, answered late
                held.set()
                await release.wait()
                return response
            return answer(request)

        registry.handle = slow_first_head  # type: ignore[assignment,method-assign]
        early = asyncio.create_task(mirror.get(PATH, method="HEAD"))
        await held.wait()
        moved, _ = registry.add_image("library/alpine", "3", LAYER + b"v2")
        mirror.clock.advance(1)
        late = await mirror.get(PATH, method="HEAD")
        assert late.headers[b"docker-content-digest"] == moved.encode()
        release.set()
        assert (await early).headers[b"docker-content-digest"] == moved.encode()
        registry.handle = _down  # type: ignore[method-assign]
        mirror.clock.advance(61)
        stale = await mirror.get(PATH, method="HEAD")
        assert stale.headers[b"docker-content-digest"] == moved.encode()
    assert old != moved


async def test_tag_records_are_purged_with_their_path_and_counted_in_the_budget(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry()
    registry.add_image("library/alpine", "3", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        cache: Cache = mirror.state["cache"]
        await mirror.get(PATH, accept="application/vnd.oci.image.manifest.v1+json")
        await mirror.get(PATH, accept="application/vnd.oci.image.index.v1+json")
        keys = _tag_records(mirror)
        assert len(keys) == 2
        assert all(cache.index.peek(k).cost > 0 for k in keys)  # type: ignore[union-attr]
        # Keyed by the route's own path of the tag: a purge of it (or a prefix) drops both.
        assert cache.purge_key(keys[0].partition(TAG_MARK)[0]) == 2
        assert _tag_records(mirror) == []
        await mirror.get(PATH)
        assert cache.purge_prefix("/dockerhub/\x00/dockerhub/v2/library/") >= 1
        assert _tag_records(mirror) == []
