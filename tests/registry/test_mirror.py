"""The registry mirror on relay's app (`preset = "oci"`) over a fake upstream registry
(`httpx.MockTransport`), with the injected clock: addressing, the token dance, blobs by
digest, tags revalidated by HEAD, stale answers, errors in the registry's form."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from relay import Config
from relay.errors import TransferAborted
from tests.registry.fake import INDEX, FakeRegistry, digest_of
from tests.registry.mirror import Mirror, cached_config, errors, oci_route

LAYER = bytes(range(256)) * 1024  # 256 KiB: several chunks
HUB = oci_route("/dockerhub/", registry_hosts=("docker.io",), registry_default=True)


def _mirror(tmp_path: Path, registry: FakeRegistry | None = None, **route_keys: Any) -> Mirror:
    route = oci_route(
        "/dockerhub/", registry_hosts=("docker.io",), registry_default=True, **route_keys
    )
    return Mirror(cached_config(tmp_path, route), registry or FakeRegistry())


def _tagged(tmp_path: Path, tag: str = "3") -> tuple[FakeRegistry, str, Mirror, str]:
    """A registry with library/alpine:`tag` (its manifest's digest), a mirror of it whose tags
    are fresh for 60 s, and the tag's path."""
    registry = FakeRegistry()
    digest, _ = registry.add_image("library/alpine", tag, LAYER)
    mirror = _mirror(tmp_path, registry, tag_max_age=60.0)
    return registry, digest, mirror, f"/v2/library/alpine/manifests/{tag}"


async def test_v2_answers_itself_with_the_api_version() -> None:
    mirror = Mirror(Config(routes=(HUB,)), FakeRegistry())
    async with mirror.running():
        client = await mirror.get("/v2/")
        assert client.status == 200
        assert client.body == b"{}"
        assert client.headers[b"docker-distribution-api-version"] == b"registry/2.0"
        assert client.headers[b"content-type"] == b"application/json"
    assert mirror.registries["registry.test"].seen == []


async def test_writes_are_refused_with_the_registry_error(tmp_path: Path) -> None:
    mirror = _mirror(tmp_path)
    async with mirror.running():
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            client = await mirror.get("/v2/library/a/blobs/uploads/", method=method)
            assert client.status == 405
            assert errors(client) == ["UNSUPPORTED"]
            assert client.headers[b"docker-distribution-api-version"] == b"registry/2.0"
    assert mirror.registries["registry.test"].seen == []


async def test_a_path_under_an_oci_prefix_that_is_not_the_registry_api_is_refused(
    tmp_path: Path,
) -> None:
    mirror = _mirror(tmp_path)
    async with mirror.running():
        client = await mirror.get("/dockerhub/library/alpine")
        assert client.status == 404
    assert mirror.registries["registry.test"].seen == []


async def test_the_token_dance_is_relays_and_tokens_are_kept_per_scope(tmp_path: Path) -> None:
    """A 401 with a Bearer challenge: relay asks the realm, retries once with the token; the
    next request of that scope carries it from the start; after expires_in, a new one."""
    registry = FakeRegistry(expires_in=120)
    digest, _ = registry.add_image("library/alpine", "3.20", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        first = await mirror.get("/v2/library/alpine/manifests/" + digest)
        assert first.status == 200
        assert len(registry.requests(host="auth.test")) == 1
        token_request = registry.requests(host="auth.test")[0]
        assert token_request.url.params["scope"] == "repository:library/alpine:pull"
        assert token_request.url.params["service"] == "registry.test"
        registry.seen.clear()
        await mirror.get("/v2/library/alpine/tags/list")
        (listed,) = registry.seen
        assert listed.headers["authorization"] == "Bearer tok-1"  # kept: no 401 first
        mirror.clock.advance(121)
        registry.seen.clear()
        await mirror.get("/v2/library/alpine/tags/list")
        assert len(registry.requests(host="auth.test")) == 1  # expired: a new token
        assert registry.requests(part="tags")[0].headers["authorization"] == "Bearer tok-2"


@pytest.mark.parametrize(
    ("realm", "host", "cause"),
    [
        (
            "https://evil.test/token",
            "evil.test",
            b"evil.test is not the registry's host or in redirect_hosts",
        ),
        ("http://auth.test/token", "auth.test", b"not https"),  # no allow_private
    ],
)
async def test_a_realm_the_route_does_not_allow_is_refused(
    tmp_path: Path, realm: str, host: str, cause: bytes
) -> None:
    registry = FakeRegistry(realm=realm)
    digest, _ = registry.add_image("library/alpine", "1", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        client = await mirror.get("/v2/library/alpine/manifests/" + digest)
        assert client.status == 502
        assert errors(client) == ["UNAVAILABLE"]
        assert cause in client.body
        assert b"www-authenticate" not in client.headers
    assert registry.requests(host=host) == []


@pytest.mark.parametrize("cached", [True, False])
async def test_client_credentials_never_reach_an_upstream(tmp_path: Path, cached: bool) -> None:
    registry = FakeRegistry(storage="storage.test")
    digest, layer = registry.add_image("library/alpine", "1", LAYER)
    mirror = _mirror(tmp_path, registry) if cached else Mirror(Config(routes=(HUB,)), registry)
    async with mirror.running():
        for method, path in (
            ("HEAD", "/v2/library/alpine/blobs/" + layer),  # a miss's HEAD: relayed
            ("GET", "/v2/library/alpine/manifests/1"),
            ("GET", "/v2/library/alpine/manifests/" + digest),
            ("GET", "/v2/library/alpine/blobs/" + layer),
            ("GET", "/v2/library/alpine/tags/list"),
        ):
            client = await mirror.get(
                path, method=method, authorization="Bearer client-token", cookie="c=1"
            )
            assert client.status == 200, path
    assert registry.seen
    for request in registry.seen:
        assert "client-token" not in request.headers.get("authorization", "")
        assert "cookie" not in request.headers


async def test_the_upstream_challenge_never_reaches_the_client(tmp_path: Path) -> None:
    """The registry refuses relay's token too (a private repository): the client gets a
    registry error of relay's, not the upstream's challenge."""
    registry = FakeRegistry()
    registry.issued.add("never")  # tokens are issued, but the registry still says 401:
    mirror = _mirror(tmp_path, registry)
    registry.auth = "bearer"
    async with mirror.running():
        registry.realm = "https://auth.test/token"
        client = await mirror.get("/v2/library/private/manifests/1")
        assert client.status == 404
        assert errors(client) == ["MANIFEST_UNKNOWN"]
        assert b"www-authenticate" not in client.headers


async def test_blobs_are_stored_once_by_digest_across_repositories_and_routes(
    tmp_path: Path,
) -> None:
    hub = FakeRegistry()
    other = FakeRegistry(host="other.test", realm="https://other.test/token")
    layer = hub.add_blob(LAYER)
    other.add_blob(LAYER)
    routes = (
        oci_route("/dockerhub/", registry_hosts=("docker.io",)),
        oci_route("/other/", "https://other.test/"),
    )
    mirror = Mirror(cached_config(tmp_path, *routes), hub, other)
    async with mirror.running():
        first = await mirror.get("/v2/dockerhub/library/alpine/blobs/" + layer)
        assert first.status == 200
        assert first.body == LAYER
        for path in (
            "/v2/dockerhub/someone/else/blobs/" + layer,
            "/v2/other/org/app/blobs/" + layer,
            "/v2/library/x/blobs/" + layer,
        ):
            query = b"ns=other.test" if path.startswith("/v2/library") else b""
            client = await mirror.get(path, query=query)
            assert client.status == 200, path
            assert client.body == LAYER
            assert client.headers[b"cache-status"].startswith(b"relay; hit")
    assert len(hub.requests("GET", part="/blobs/")) == 1
    assert other.requests("GET", part="/blobs/") == []


async def test_concurrent_pulls_of_a_cold_blob_cost_one_upstream_fetch(tmp_path: Path) -> None:
    registry = FakeRegistry(storage="storage.test")
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        clients = await asyncio.gather(
            *(mirror.get(f"/v2/library/app{i}/blobs/{layer}") for i in range(8))
        )
        assert all(c.status == 200 and c.body == LAYER for c in clients)
    assert len(registry.requests("GET", host="storage.test")) == 1
    assert len(registry.requests("GET", host="registry.test", part="/blobs/")) == 1


async def test_a_blob_head_and_get_carry_the_registry_headers(tmp_path: Path) -> None:
    registry = FakeRegistry(storage="storage.test")
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        for method in ("HEAD", "GET", "HEAD"):  # a miss's HEAD (relayed), a fill, a hit
            client = await mirror.get("/v2/library/a/blobs/" + layer, method=method)
            headers = client.headers
            assert client.status == 200
            assert headers[b"content-length"] == str(len(LAYER)).encode()
            assert headers[b"docker-content-digest"] == layer.encode()
            assert headers[b"content-type"] == b"application/octet-stream"
            assert headers[b"docker-distribution-api-version"] == b"registry/2.0"
            assert b"x-amz-request-id" not in headers
        ranged = await mirror.get("/v2/library/a/blobs/" + layer, range="bytes=10-19")
        assert ranged.status == 206
        assert ranged.body == LAYER[10:20]


async def test_redirects_to_object_storage_carry_no_registry_token(tmp_path: Path) -> None:
    registry = FakeRegistry(storage="storage.test")
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        assert (await mirror.get("/v2/library/a/blobs/" + layer)).body == LAYER
    (fetched,) = registry.requests("GET", host="storage.test")
    assert "authorization" not in fetched.headers


async def test_a_redirect_to_a_host_not_allowed_is_not_followed(tmp_path: Path) -> None:
    registry = FakeRegistry(storage="elsewhere.test")
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        client = await mirror.get("/v2/library/a/blobs/" + layer)
        assert client.status == 502
        assert errors(client) == ["UNAVAILABLE"]
    assert registry.requests(host="elsewhere.test") == []


@pytest.mark.parametrize("cached", [True, False])
async def test_a_tampered_blob_aborts_the_transfer_and_is_not_stored(
    tmp_path: Path, cached: bool
) -> None:
    registry = FakeRegistry()
    layer = registry.add_blob(LAYER)
    registry.tampered[layer] = LAYER[:-1] + b"\x00"
    route = oci_route("/dockerhub/", registry_default=True)
    config = cached_config(tmp_path, route) if cached else Config(routes=(route,))
    mirror = Mirror(config, registry)
    async with mirror.running():
        for _ in range(2):
            with pytest.raises(TransferAborted):
                await mirror.get("/v2/library/a/blobs/" + layer)
        cache = mirror.state.get("cache")
        if cache is not None:
            assert cache.index.entries() == []
            assert cache.stats.digest_mismatches == 2
    fetched = [r for r in registry.requests("GET", part="/blobs/") if "authorization" in r.headers]
    assert len(fetched) == 2  # never answered from a store


async def test_without_the_cache_a_blob_is_relayed_and_verified(tmp_path: Path) -> None:
    registry = FakeRegistry()
    layer = registry.add_blob(LAYER)
    mirror = Mirror(Config(routes=(HUB,)), registry)
    async with mirror.running():
        client = await mirror.get("/v2/library/a/blobs/" + layer)
        assert client.status == 200
        assert client.body == LAYER
        assert client.completed
        assert client.headers[b"docker-content-digest"] == layer.encode()


async def test_a_tag_is_checked_with_a_head_and_an_unchanged_tag_costs_no_get(
    tmp_path: Path,
) -> None:
    registry, digest, mirror, path = _tagged(tmp_path, "3.20")
    async with mirror.running():
        first = await mirror.get(path)
        assert first.status == 200
        assert first.headers[b"docker-content-digest"] == digest.encode()
        assert digest_of(first.body) == digest
        assert first.headers[b"cache-status"] == b"relay; fwd=miss"
        registry.seen.clear()
        fresh = await mirror.get(path)
        assert fresh.body == first.body
        assert fresh.headers[b"cache-status"].startswith(b"relay; hit; ttl=")
        assert registry.seen == []
        mirror.clock.advance(61)
        checked = await mirror.get(path)
        assert checked.body == first.body
        assert checked.headers[b"cache-status"] == b"relay; fwd=stale; fwd-status=304"
        assert [r.method for r in registry.requests(part="/manifests/")] == ["HEAD"]


async def test_a_moved_tag_is_seen_after_its_freshness(tmp_path: Path) -> None:
    registry, _, mirror, path = _tagged(tmp_path)
    async with mirror.running():
        await mirror.get(path)
        moved, _ = registry.add_image("library/alpine", "3", LAYER + b"v2")
        assert (await mirror.get(path)).headers[b"docker-content-digest"] != moved.encode()
        mirror.clock.advance(61)
        client = await mirror.get(path)
        assert client.headers[b"docker-content-digest"] == moved.encode()
        assert digest_of(client.body) == moved
        assert client.headers[b"cache-status"] == b"relay; fwd=stale"


@pytest.mark.parametrize("status", [429, 503])
async def test_a_stored_tag_is_answered_stale_when_the_upstream_errs(
    tmp_path: Path, status: int
) -> None:
    registry, digest, mirror, path = _tagged(tmp_path)
    async with mirror.running():
        first = await mirror.get(path)
        mirror.clock.advance(61)
        registry.manifest_status = status
        for method in ("GET", "HEAD"):
            client = await mirror.get(path, method=method)
            assert client.status == 200
            assert client.headers[b"docker-content-digest"] == digest.encode()
            assert client.headers[b"cache-status"] == (
                f'relay; hit; fwd=stale; fwd-status={status}; detail="stale-if-error"'.encode()
            )
            assert client.headers[b"content-length"] == str(len(first.body)).encode()
        assert (await mirror.get(path)).body == first.body
        unknown = await mirror.get("/v2/library/alpine/manifests/other")
        assert unknown.status == (429 if status == 429 else 502)
        assert errors(unknown) == ["TOOMANYREQUESTS" if status == 429 else "UNAVAILABLE"]


async def test_a_stored_tag_is_answered_stale_when_the_upstream_is_unreachable(
    tmp_path: Path,
) -> None:
    import httpx

    registry, digest, mirror, path = _tagged(tmp_path)
    async with mirror.running():
        await mirror.get(path)
        mirror.clock.advance(61)

        def down(request: httpx.Request) -> httpx.Response:
            raise httpx.ConnectError("refused")

        registry.handle = down  # type: ignore[method-assign]
        client = await mirror.get(path)
        assert client.status == 200
        assert b"stale-if-error" in client.headers[b"cache-status"]
        assert digest_of(client.body) == digest


async def test_a_manifest_head_by_tag_is_exact(tmp_path: Path) -> None:
    registry = FakeRegistry()
    body = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": []}).encode()
    digest = registry.tag("library/multi", "1", INDEX, body)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        for method in ("HEAD", "GET", "HEAD"):
            client = await mirror.get("/v2/library/multi/manifests/1", method=method, accept=INDEX)
            assert client.status == 200
            assert client.headers[b"content-type"] == INDEX.encode()
            assert client.headers[b"content-length"] == str(len(body)).encode()
            assert client.headers[b"docker-content-digest"] == digest.encode()
            assert client.body == (body if method == "GET" else b"")


async def test_a_tag_is_keyed_by_the_requests_accept(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add_image("library/a", "1", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        await mirror.get(
            "/v2/library/a/manifests/1", accept="application/vnd.oci.image.manifest.v1+json"
        )
        await mirror.get(
            "/v2/library/a/manifests/1", accept="application/vnd.oci.image.index.v1+json"
        )
        await mirror.get(
            "/v2/library/a/manifests/1", accept="application/vnd.oci.image.index.v1+json"
        )
    heads = [
        r for r in registry.requests("HEAD", part="/manifests/") if "authorization" in r.headers
    ]
    assert [h.headers["accept"] for h in heads] == [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    ]


async def test_every_accept_line_counts(tmp_path: Path) -> None:
    """skopeo and containerd send one Accept line per media type: all of them select the
    manifest's form (the first alone made the registry answer 404 for an index)."""
    registry = FakeRegistry()
    registry.add_image("library/a", "1", LAYER)
    mirror = _mirror(tmp_path, registry)
    lines = [
        (b"accept", INDEX.encode()),
        (b"accept", b"application/vnd.oci.image.manifest.v1+json"),
    ]
    async with mirror.running():
        assert (await mirror.get("/v2/library/a/manifests/1", more=lines)).status == 200
    (head,) = [
        r for r in registry.requests("HEAD", part="/manifests/") if "authorization" in r.headers
    ]
    assert head.headers["accept"] == f"{INDEX},application/vnd.oci.image.manifest.v1+json"


async def test_a_manifest_by_digest_is_verified(tmp_path: Path) -> None:
    registry = FakeRegistry()
    digest, _ = registry.add_image("library/a", "1", LAYER)
    media_type, body = registry.manifests[digest]
    registry.manifests[digest] = (media_type, body + b" ")
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        with pytest.raises(TransferAborted):
            await mirror.get("/v2/library/a/manifests/" + digest)


async def test_upstream_404s_keep_their_registry_codes(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add_image("library/a", "1", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        missing = await mirror.get("/v2/library/a/manifests/nope")
        assert (missing.status, errors(missing)) == (404, ["MANIFEST_UNKNOWN"])
        unknown = await mirror.get("/v2/library/none/manifests/sha256:" + "0" * 64)
        assert (unknown.status, errors(unknown)) == (404, ["NAME_UNKNOWN"])
        blob = await mirror.get("/v2/library/a/blobs/sha256:" + "0" * 64)
        assert (blob.status, errors(blob)) == (404, ["BLOB_UNKNOWN"])
        bad = await mirror.get("/v2/library/a/blobs/sha512:" + "0" * 128)
        assert (bad.status, errors(bad)) == (400, ["DIGEST_INVALID"])


async def test_basic_challenges_use_the_routes_credentials_or_fail_naming_the_cause(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(auth="basic")
    digest, _ = registry.add_image("library/a", "1", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        client = await mirror.get("/v2/library/a/manifests/" + digest)
        assert client.status == 502
        assert b"username_env" in client.body
    route = oci_route(
        "/dockerhub/", registry_default=True, username_env="REG_USER", password_env="REG_PASS"
    ).resolve_credential({"REG_USER": "user", "REG_PASS": "pass"})
    mirror = Mirror(cached_config(tmp_path / "2", route), registry)
    async with mirror.running():
        client = await mirror.get("/v2/library/a/manifests/" + digest)
        assert client.status == 200


async def test_token_requests_carry_the_routes_credentials(tmp_path: Path) -> None:
    registry = FakeRegistry()
    digest, _ = registry.add_image("library/a", "1", LAYER)
    route = oci_route(
        "/dockerhub/", registry_default=True, username_env="U", password_env="P"
    ).resolve_credential({"U": "user", "P": "pass"})
    mirror = Mirror(cached_config(tmp_path, route), registry)
    async with mirror.running():
        assert (await mirror.get("/v2/library/a/manifests/" + digest)).status == 200
    (token,) = registry.requests(host="auth.test")
    assert token.headers["authorization"] == "Basic dXNlcjpwYXNz"
    for request in registry.requests(host="registry.test"):
        assert not request.headers.get("authorization", "").startswith("Basic")


async def test_a_tags_list_is_relayed_with_its_link_on_relays_path(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add_image("library/a", "1", LAYER)
    registry.add_image("library/a", "2", LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        client = await mirror.get("/v2/dockerhub/library/a/tags/list", query=b"n=1")
        assert client.status == 200
        assert json.loads(client.body) == {"name": "library/a", "tags": ["1"]}
        assert (
            client.headers[b"link"] == b'</v2/dockerhub/library/a/tags/list?n=1&last=1>; rel="next"'
        )
    (listed,) = [r for r in registry.requests(part="/tags/list") if "authorization" in r.headers]
    assert listed.url.query == b"n=1"


async def test_client_authentication_is_relays_own_challenge(tmp_path: Path) -> None:
    registry = FakeRegistry()
    digest, _ = registry.add_image("library/a", "1", LAYER)
    mirror = Mirror(cached_config(tmp_path, HUB, client_secret="s3cret"), registry)
    async with mirror.running():
        refused = await mirror.get("/v2/")
        assert refused.status == 401
        assert errors(refused) == ["UNAUTHORIZED"]
        assert refused.headers[b"www-authenticate"] == b'Basic realm="relay"'
        wrong = await mirror.get("/v2/", authorization="Basic dTp3cm9uZw==")  # u:wrong
        assert (wrong.status, errors(wrong)) == (403, ["DENIED"])
        ok = await mirror.get("/v2/", authorization="Basic dTpzM2NyZXQ=")  # u:s3cret
        assert ok.status == 200
        header = await mirror.get("/v2/library/a/manifests/" + digest, x_relay_secret="s3cret")
        assert header.status == 200
        blob = await mirror.get("/v2/library/a/manifests/" + digest)
        assert blob.status == 401
    assert all("s3cret" not in r.headers.get("authorization", "") for r in registry.seen)


async def test_metrics_count_token_fetches_and_tag_answers(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add_image("library/a", "1", LAYER)
    mirror = _mirror(tmp_path, registry, tag_max_age=60.0)
    async with mirror.running():
        await mirror.get("/v2/library/a/manifests/1")
        await mirror.get("/v2/library/a/manifests/1")
        mirror.clock.advance(61)
        registry.manifest_status = 429
        await mirror.get("/v2/library/a/manifests/1")
        text = (await mirror.get("/metrics")).body.decode()
    for line in (
        'relay_registry_token_fetches_total{outcome="ok",route="/dockerhub/"} 1.0',
        'relay_registry_tag_answers_total{outcome="miss",route="/dockerhub/"} 1.0',
        'relay_registry_tag_answers_total{outcome="hit",route="/dockerhub/"} 1.0',
        'relay_registry_tag_answers_total{outcome="stale",route="/dockerhub/"} 1.0',
    ):
        assert line in text, line


async def test_a_range_of_a_cold_blob_is_answered_from_what_is_fetched(tmp_path: Path) -> None:
    registry = FakeRegistry(storage="storage.test")
    layer = registry.add_blob(LAYER)
    mirror = _mirror(tmp_path, registry)
    async with mirror.running():
        ranged = await mirror.get("/v2/library/a/blobs/" + layer, range="bytes=1000-1999")
        assert ranged.status == 206
        assert ranged.body == LAYER[1000:2000]
        assert ranged.headers[b"content-range"] == f"bytes 1000-1999/{len(LAYER)}".encode()
        assert ranged.headers[b"docker-content-digest"] == layer.encode()
        tail = await mirror.get("/v2/library/a/blobs/" + layer, range=f"bytes={len(LAYER) - 10}-")
        assert tail.body == LAYER[-10:]
    for request in registry.requests(host="storage.test"):
        assert "authorization" not in request.headers
