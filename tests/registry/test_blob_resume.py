"""A blob cut mid-body is continued although its upstream sends no ETag (nor
`Accept-Ranges`): its identity is pinned by its digest, which relay verifies before the last
byte (`relay.http.continuation`, pinned); bytes that do not match abort the transfer."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import Config
from relay.errors import TransferAborted
from tests.registry.fake import FakeRegistry, digest_of
from tests.registry.mirror import Mirror, cached_config, oci_route

LAYER = bytes(range(256)) * 1024  # 256 KiB: four chunks of the fake's 64 KiB
CUT = 128 * 1024


def _mirror(tmp_path: Path, registry: FakeRegistry, cached: bool) -> Mirror:
    route = oci_route("/dockerhub/", registry_default=True)
    return Mirror(cached_config(tmp_path, route) if cached else Config(routes=(route,)), registry)


def _blob_gets(registry: FakeRegistry) -> list[dict[str, str]]:
    return [
        dict(r.headers)
        for r in registry.requests("GET", part="/blobs/")
        if "authorization" in r.headers
    ]


def _cut_blob() -> tuple[FakeRegistry, str]:
    """A registry whose blob (no ETag, no Accept-Ranges) is cut at `CUT` once; its digest."""
    registry = FakeRegistry(accept_ranges=False)
    layer = registry.add_blob(LAYER)
    registry.cut_once[layer] = CUT
    return registry, layer


@pytest.mark.parametrize("cached", [True, False])
async def test_a_blob_without_validator_cut_mid_body_is_resumed_byte_exact(
    tmp_path: Path, cached: bool
) -> None:
    registry, layer = _cut_blob()
    mirror = _mirror(tmp_path, registry, cached)
    async with mirror.running():
        client = await mirror.get("/v2/library/a/blobs/" + layer)
        assert client.status == 200
        assert client.completed
        assert client.body == LAYER
        assert digest_of(client.body) == layer
        if cached:
            again = await mirror.get("/v2/library/a/blobs/" + layer)
            assert again.headers[b"cache-status"].startswith(b"relay; hit")
    first, resumed = _blob_gets(registry)
    assert "range" not in first
    assert resumed["range"] in (f"bytes={CUT}-", f"bytes={CUT}-{len(LAYER) - 1}")
    assert "if-range" not in resumed  # no validator to send: the digest pins the body


@pytest.mark.parametrize("cached", [True, False])
async def test_tampered_bytes_after_a_resume_abort_the_transfer(
    tmp_path: Path, cached: bool
) -> None:
    registry, layer = _cut_blob()
    registry.tampered_ranges[layer] = LAYER[:-1] + b"\x00"
    mirror = _mirror(tmp_path, registry, cached)
    async with mirror.running():
        with pytest.raises(TransferAborted):
            await mirror.get("/v2/library/a/blobs/" + layer)
        cache = mirror.state.get("cache")
        if cache is not None:
            assert cache.index.entries() == []
            assert cache.stats.digest_mismatches == 1
    ranges = [h.get("range") for h in _blob_gets(registry)]
    assert ranges[0] is None
    assert len(ranges) == 2
    assert (ranges[1] or "").startswith(f"bytes={CUT}-")


@pytest.mark.parametrize("asked", ["bytes=0-", f"bytes=0-{len(LAYER) - 1}"])
async def test_without_the_cache_a_range_of_the_whole_blob_is_verified(
    tmp_path: Path, asked: str
) -> None:
    """A relayed 206 holding every byte of the blob is checked against its digest like a
    200 (a part of it cannot be, and is relayed as it comes)."""
    registry = FakeRegistry()
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry, cached=False)
    async with mirror.running():
        whole = await mirror.get("/v2/library/a/blobs/" + layer, range=asked)
        assert whole.status == 206
        assert whole.completed
        assert whole.body == LAYER
        registry.tampered[layer] = LAYER[:-1] + b"\x00"
        with pytest.raises(TransferAborted):
            await mirror.get("/v2/library/a/blobs/" + layer, range=asked)
        part = await mirror.get("/v2/library/a/blobs/" + layer, range="bytes=0-999")
        assert part.body == LAYER[:1000]
