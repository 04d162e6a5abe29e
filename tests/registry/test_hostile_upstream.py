"""A lying upstream registry against the mirror: answers shaped to break relay's parsing
end as the registry's own errors, never as a 500."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.registry.fake import FakeRegistry
from tests.registry.mirror import Mirror, cached_config, errors, oci_route

LAYER = bytes(range(256)) * 64
#: Nested deeper than Python's recursion limit, yet smaller than every body relay reads.
DEEP_JSON = b"[" * 16000


class _DeepToken(FakeRegistry):
    def _token(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return httpx.Response(200, content=DEEP_JSON)


class _Deep404(FakeRegistry):
    def _manifest(self, request: httpx.Request, name: str, reference: str) -> httpx.Response:
        return httpx.Response(404, content=DEEP_JSON)


def _mirror(tmp_path: Path, registry: FakeRegistry) -> Mirror:
    route = oci_route("/dockerhub/", registry_hosts=("docker.io",), registry_default=True)
    return Mirror(cached_config(tmp_path, route), registry)


async def test_a_deeply_nested_token_answer_is_a_502_not_a_500(tmp_path: Path) -> None:
    registry = _DeepToken()
    digest, _ = registry.add_image("library/a", "1", LAYER)
    async with _mirror(tmp_path, registry).running() as mirror:
        client = await mirror.get("/v2/library/a/manifests/" + digest)
        assert client.status == 502
        assert errors(client) == ["UNAVAILABLE"]


async def test_a_deeply_nested_404_body_keeps_the_registry_code(tmp_path: Path) -> None:
    registry = _Deep404(auth="")
    digest, _ = registry.add_image("library/a", "1", LAYER)
    async with _mirror(tmp_path, registry).running() as mirror:
        client = await mirror.get("/v2/library/a/manifests/" + digest)
        assert (client.status, errors(client)) == (404, ["MANIFEST_UNKNOWN"])
