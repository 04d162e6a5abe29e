"""A cache fill whose registry token expired meanwhile (a later slice of a long answer, a
resume): the 401 is answered by a new token and one retry, and what it fetches is stored;
the fill is not relayed instead."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.registry.fake import FakeRegistry
from tests.registry.mirror import Mirror, cached_config, oci_route

LAYER = bytes(range(256)) * 4096  # 1 MiB


def _mirror(tmp_path: Path, registry: FakeRegistry) -> Mirror:
    route = oci_route("/dockerhub/", registry_default=True)
    return Mirror(cached_config(tmp_path, route, cache_slice_bytes=256 * 1024), registry)


def _blob_gets(registry: FakeRegistry) -> list[tuple[int, str]]:
    """(which token, Range) of each blob GET that carried a token."""
    return [
        (int(r.headers["authorization"].removeprefix("Bearer tok-")), r.headers.get("range", ""))
        for r in registry.requests("GET", part="/blobs/")
        if "authorization" in r.headers
    ]


async def test_a_later_slice_whose_token_expired_is_fetched_with_a_new_one_and_stored(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(expires_in=3600, etag=True)
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry)
    path = "/v2/library/a/blobs/" + layer
    async with mirror.running():
        first = await mirror.get(path, range="bytes=0-999")
        assert first.body == LAYER[:1000]
        # The registry no longer takes the token relay still holds as valid.
        registry.issued.discard("tok-1")
        later = await mirror.get(path, range="bytes=600000-600999")
        assert later.status == 206
        assert later.body == LAYER[600000:601000]
        again = await mirror.get(path, range="bytes=600000-600999")
        assert again.body == LAYER[600000:601000]
        assert again.headers[b"cache-status"].startswith(b"relay; hit")
    gets = _blob_gets(registry)
    assert gets[-2:] == [(1, "bytes=524288-786431"), (2, "bytes=524288-786431")]
    assert len(registry.requests(host="auth.test")) == 2  # one new token, not one per request


async def test_a_resume_whose_token_expired_is_retried_with_a_new_one(tmp_path: Path) -> None:
    registry = FakeRegistry(expires_in=3600, etag=True)
    layer = registry.add_blob(LAYER)
    cut = 512 * 1024
    registry.cut_once[layer] = cut
    answer = registry.handle

    def expiring(request: httpx.Request) -> httpx.Response:
        if "range" in request.headers and registry.issued == {"tok-1"}:
            registry.issued.clear()  # the token expired while the body was being read
        return answer(request)

    registry.handle = expiring  # type: ignore[method-assign]
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        client = await mirror.get("/v2/library/a/blobs/" + layer)
        assert client.status == 200
        assert client.completed
        assert client.body == LAYER
        again = await mirror.get("/v2/library/a/blobs/" + layer)
        assert again.headers[b"cache-status"].startswith(b"relay; hit")
    rest = f"bytes={cut}-{len(LAYER) - 1}"
    assert _blob_gets(registry) == [(1, ""), (1, rest), (2, rest)]
