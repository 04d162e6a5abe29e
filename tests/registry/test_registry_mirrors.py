"""An oci route with several registries (`upstreams`: a registry and its copies), each its own
registry to relay: its own challenge, realm, credentials and tokens. A token goes only to the
registry whose realm issued it; a registry that is down passes the pull on to the next; a blob
cut on one registry is finished from another, from the byte it had, and verified."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from relay import Config, Route
from relay.config import Mirror as RouteMirror
from relay.errors import ConfigError, TransferAborted
from tests.registry.fake import FakeRegistry, digest_of
from tests.registry.mirror import Mirror, cached_config

LAYER = bytes(range(256)) * 1024  # 256 KiB: four chunks of the fake's 64 KiB
CUT = 128 * 1024


def _registries(**b_keys: Any) -> tuple[FakeRegistry, FakeRegistry]:
    a = FakeRegistry(host="registry-a.test", realm="https://auth-a.test/token", token_prefix="a")
    b = FakeRegistry(
        host="registry-b.test", realm="https://auth-b.test/token", token_prefix="b", **b_keys
    )
    return a, b


def _route(*upstreams: str | RouteMirror, **keys: Any) -> Route:
    keys.setdefault("failover", "any")
    return Route(
        prefix="/hub/",
        upstreams=tuple(
            m if isinstance(m, RouteMirror) else RouteMirror(url=m)
            for m in upstreams or ("https://registry-a.test/", "https://registry-b.test/")
        ),
        preset="oci",
        registry_default=True,
        redirect_hosts=("auth-a.test", "auth-b.test"),
        **keys,
    )


def _mirror(
    tmp_path: Path, a: FakeRegistry, b: FakeRegistry, *, cached: bool = True, **keys: Any
) -> Mirror:
    route = _route(**keys)
    return Mirror(cached_config(tmp_path, route) if cached else Config(routes=(route,)), a, b)


def _tokens_sent(registry: FakeRegistry) -> set[str]:
    return {
        r.headers["authorization"].removeprefix("Bearer ")
        for r in registry.seen
        if "authorization" in r.headers and r.headers["authorization"].startswith("Bearer ")
    }


def _same_image(a: FakeRegistry, b: FakeRegistry) -> tuple[str, str]:
    manifest, layer = a.add_image("library/alpine", "3", LAYER)
    assert b.add_image("library/alpine", "3", LAYER) == (manifest, layer)
    return manifest, layer


@pytest.mark.parametrize("cached", [True, False])
async def test_a_registry_down_passes_the_pull_to_the_next_with_its_own_token(
    tmp_path: Path, cached: bool
) -> None:
    a, b = _registries()
    manifest, layer = _same_image(a, b)
    a.down = True
    mirror = _mirror(tmp_path, a, b, cached=cached, max_fails=0)  # a never rests
    async with mirror.running():
        for path in (
            f"/v2/library/alpine/manifests/{manifest}",
            f"/v2/library/alpine/blobs/{layer}",
        ):
            client = await mirror.get(path)
            assert client.status == 200, client.body
            assert client.completed
        assert digest_of(client.body) == layer
        tag = await mirror.get("/v2/library/alpine/manifests/3")
        assert tag.status == 200
        assert tag.headers[b"docker-content-digest"] == manifest.encode()
        a.down = False  # back: the next pull is its own again, with its own token
        other = a.add_blob(b"another layer")
        assert (await mirror.get(f"/v2/library/alpine/blobs/{other}")).status == 200
    assert _tokens_sent(b)
    assert all(t.startswith("b-") for t in _tokens_sent(b))
    assert _tokens_sent(a)
    assert all(t.startswith("a-") for t in _tokens_sent(a))
    assert a.requests(host="auth-b.test") == []
    assert b.requests(host="auth-a.test") == []


@pytest.mark.parametrize("cached", [True, False])
async def test_a_blob_cut_on_one_registry_is_finished_from_the_next_and_verified(
    tmp_path: Path, cached: bool
) -> None:
    a, b = _registries()
    _, layer = _same_image(a, b)
    a.cut_once[layer] = CUT
    mirror = _mirror(tmp_path, a, b, cached=cached)
    async with mirror.running():
        client = await mirror.get(f"/v2/library/alpine/blobs/{layer}")
        assert client.status == 200
        assert client.completed
        assert client.body == LAYER
        if cached:
            again = await mirror.get(f"/v2/library/alpine/blobs/{layer}")
            assert again.headers[b"cache-status"].startswith(b"relay; hit")
    (rest,) = [r for r in b.requests("GET", part="/blobs/") if "authorization" in r.headers]
    assert rest.headers["range"].startswith(f"bytes={CUT}-")
    assert "if-range" not in rest.headers
    assert rest.headers["authorization"].startswith("Bearer b-")  # its own token, not a's


@pytest.mark.parametrize("cached", [True, False])
async def test_wrong_bytes_from_the_next_registry_abort_the_pull(
    tmp_path: Path, cached: bool
) -> None:
    a, b = _registries()
    _, layer = _same_image(a, b)
    a.cut_once[layer] = CUT
    b.tampered_ranges[layer] = LAYER[:-1] + b"\x00"
    mirror = _mirror(tmp_path, a, b, cached=cached)
    async with mirror.running():
        with pytest.raises(TransferAborted):
            await mirror.get(f"/v2/library/alpine/blobs/{layer}")
        cache = mirror.state.get("cache")
        if cache is not None:
            assert cache.index.entries() == []
            assert cache.stats.digest_mismatches == 1


async def test_each_registry_gets_its_own_credentials_only(tmp_path: Path) -> None:
    """Registry b wants Basic with its own account; a is anonymous: a never sees it."""
    a, b = _registries(auth="basic")
    _, layer = _same_image(a, b)
    a.auth = ""
    a.down = True
    route = _route(
        "https://registry-a.test/",
        RouteMirror(url="https://registry-b.test/", username_env="B_USER", password_env="B_PASS"),
        max_fails=0,
    )
    config = cached_config(tmp_path, route.resolve_credential({"B_USER": "user", "B_PASS": "pass"}))
    mirror = Mirror(config, a, b)
    async with mirror.running():
        client = await mirror.get(f"/v2/library/alpine/blobs/{layer}")
        assert client.status == 200
        assert client.body == LAYER
        a.down = False
        other = a.add_blob(b"another layer")
        assert (await mirror.get(f"/v2/library/alpine/blobs/{other}")).status == 200
    assert all("authorization" not in r.headers for r in a.seen)
    assert any(r.headers.get("authorization") == "Basic dXNlcjpwYXNz" for r in b.seen)


async def test_a_token_never_follows_the_request_to_another_registry() -> None:
    """Unit: a request built for registry a with a's token, moved to registry b, carries b's
    kept token (or none), never a's."""
    from relay.http.authorize import AUTHORIZER
    from relay.net.upstream import Upstream

    class Kept:
        def known(self, mirror: int) -> str | None:
            return None if mirror == 1 else "Bearer a-1"

        async def renew(self, mirror: int, refused: httpx.Response) -> str:
            raise AssertionError("not asked")

    route = _route()
    upstream = Upstream(httpx.AsyncClient(), Config(routes=(route,)))
    request = upstream.build_request(
        "GET",
        "https://registry-a.test/v2/x/blobs/sha256:0",
        [("authorization", "Bearer a-1")],
        route,
    )
    request.extensions[AUTHORIZER] = Kept()
    moved = upstream.for_mirror(request, route, 0, 1)
    assert "authorization" not in moved.headers
    assert moved.extensions[AUTHORIZER] is request.extensions[AUTHORIZER]
    back = upstream.for_mirror(moved, route, 1, 0)
    assert back.headers["authorization"] == "Bearer a-1"


@pytest.mark.parametrize(
    ("keys", "cause"),
    [
        (
            {
                "upstreams": ("https://a.test/", "https://b.test/"),
                "username_env": "U",
                "password_env": "P",
            },
            "give each mirror its own user name",
        ),
        (
            {"upstreams": ("https://a.test/", RouteMirror(url="https://b.test/", auth_env="X"))},
            "username_env/password_env, not auth_env",
        ),
        ({"upstreams": ("https://a.test/", "https://b.test/v2/")}, "no path"),
        (
            # not told to give each mirror its own auth_env, which an oci route refuses next
            {"upstreams": ("https://a.test/", "https://b.test/"), "auth_env": "X"},
            "takes username_env/password_env, not auth_env",
        ),
    ],
)
def test_oci_mirror_settings_are_checked(keys: dict[str, Any], cause: str) -> None:
    with pytest.raises(ConfigError, match=cause):
        Route(prefix="/hub/", preset="oci", **keys)


def test_a_mirrors_login_needs_both_names() -> None:
    with pytest.raises(ConfigError, match="both username_env and password_env"):
        RouteMirror(url="https://b.test/", username_env="U")


def test_registry_logins_are_for_oci_routes_only() -> None:
    with pytest.raises(ConfigError, match="for preset = 'oci'"):
        Route(
            prefix="/p/",
            upstreams=(
                RouteMirror(url="https://a.test/"),
                RouteMirror(url="https://b.test/", username_env="U", password_env="P"),
            ),
        )


def test_the_first_registrys_login_is_the_routes() -> None:
    route = Route(
        prefix="/hub/",
        preset="oci",
        upstreams=(
            RouteMirror(url="https://a.test/", username_env="AU", password_env="AP"),
            RouteMirror(url="https://b.test/", username_env="BU", password_env="BP"),
        ),
    ).resolve_credential({"AU": "a", "AP": "1", "BU": "b", "BP": "2"})
    assert route.mirror_login(0) == ("a", "1")
    assert route.mirror_login(1) == ("b", "2")
    assert "'1'" not in repr(route.describe())
    assert "'2'" not in repr(route.describe())


@pytest.mark.parametrize("cached", [True, False])
async def test_a_registry_whose_realm_fails_passes_the_pull_to_the_next(
    tmp_path: Path, cached: bool
) -> None:
    """Registry a is known to want a token (a first pull learned its challenge); then a and
    its realm go down: a pull needing a new token is finished by b, not answered 502 before
    b is asked."""
    a, b = _registries()
    _same_image(a, b)
    other = LAYER[::-1]
    _, layer = a.add_image("library/busybox", "1", other)
    assert b.add_image("library/busybox", "1", other)[1] == layer
    mirror = _mirror(tmp_path, a, b, cached=cached, max_fails=0)
    async with mirror.running():
        first = await mirror.get("/v2/library/alpine/manifests/3")
        assert first.status == 200
        assert _tokens_sent(a)
        a.down = True  # its realm too: a new scope's token cannot be had from it
        client = await mirror.get(f"/v2/library/busybox/blobs/{layer}")
        assert client.status == 200, client.body
        assert client.completed
        assert client.body == other
    assert all(t.startswith("b-") for t in _tokens_sent(b))


@pytest.mark.parametrize("cached", [True, False])
async def test_a_registry_cannot_name_another_registrys_own_host_realm(
    tmp_path: Path, cached: bool
) -> None:
    """Registry b names registry a's realm (on a's own host, as ghcr.io's and quay.io's
    are, not in redirect_hosts): b's account never goes to a, and a token a's realm issued
    never goes to b: b's pull fails (502)."""
    a, b = _registries()
    a.realm = "https://registry-a.test/token"
    b.realm = "https://registry-a.test/token"  # lying: a's realm, not its own
    _, layer = _same_image(a, b)
    a.down = True
    route = _route(
        "https://registry-a.test/",
        RouteMirror(url="https://registry-b.test/", username_env="B_USER", password_env="B_PASS"),
        max_fails=0,
    )
    settings = {"B_USER": "user", "B_PASS": "pass"}
    route = route.resolve_credential(settings)
    config = cached_config(tmp_path, route) if cached else Config(routes=(route,))
    async with Mirror(config, a, b).running() as mirror:
        a.down = False
        mirror.registries = {"registry-b.test": b, "registry-a.test": a}
        a_blob = a.add_blob(b"only a has this")
        assert (await mirror.get(f"/v2/library/alpine/blobs/{a_blob}")).status == 200
        a.down = True  # b answers now, naming a's realm
        client = await mirror.get(f"/v2/library/alpine/blobs/{layer}")
        assert client.status == 502
    assert all(r.headers.get("authorization") != "Basic dXNlcjpwYXNz" for r in a.seen)
    assert not any(t.startswith("a-") for t in _tokens_sent(b))


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("kind", ["blob", "manifest"])
async def test_other_bytes_for_a_digest_from_the_next_registry_are_refused(
    tmp_path: Path, cached: bool, kind: str
) -> None:
    """Registry a is down; b answers 200 to a digest with other bytes (a lying copy): the
    pull is aborted and nothing is stored."""
    a, b = _registries()
    manifest, layer = _same_image(a, b)
    digest = layer if kind == "blob" else manifest
    if kind == "blob":
        b.tampered[layer] = LAYER[:-1] + b"\x00"
    else:
        media_type, body = b.manifests[manifest]
        b.manifests[manifest] = (
            media_type,
            body.replace(b'"schemaVersion": 2', b'"schemaVersion": 3'),
        )
        assert b.manifests[manifest][1] != body
    a.down = True
    mirror = _mirror(tmp_path, a, b, cached=cached, max_fails=0)
    path = f"/v2/library/alpine/{kind}s/{digest}"
    async with mirror.running():
        try:
            client = await mirror.get(path)
        except TransferAborted:
            pass
        else:
            assert client.status >= 500 or not client.completed, client.status
        cache = mirror.state.get("cache")
        if cache is not None:
            assert cache.index.entries() == []


class _NeverIssued(set[str]):
    """A registry that takes none of the tokens its realm issues: 401 with a fresh
    challenge every time."""

    def add(self, element: str) -> None:
        pass


@pytest.mark.parametrize("cached", [True, False])
@pytest.mark.parametrize("failover", ["any", "not-found"])
async def test_a_registry_that_always_answers_401_is_asked_once_again_per_request(
    tmp_path: Path, cached: bool, failover: str
) -> None:
    """Each request sent to a registry that refuses every token gets one retry with a new
    token, never more; a 401 does not pass the pull on (it is not a failure), and the
    client gets an answer."""
    a, b = _registries()
    manifest, layer = _same_image(a, b)
    a.issued = _NeverIssued()
    mirror = _mirror(tmp_path, a, b, cached=cached, failover=failover)
    async with mirror.running():
        for path in (
            f"/v2/library/alpine/manifests/{manifest}",
            f"/v2/library/alpine/blobs/{layer}",
            "/v2/library/alpine/manifests/3",
        ):
            a.seen.clear()
            client = await mirror.get(path)
            assert client.status == 404, client.body  # relay's answer for a standing 401
            asked = [r for r in a.seen if r.url.host == "registry-a.test" and r.url.path != "/v2/"]
            # One request and its retry; with the cache, a blob's fill, then the same again
            # for its client when the fill's answer is a 401 (as with one registry).
            assert len(asked) in ((2, 4) if cached else (2,)), [str(r.url) for r in asked]
    assert b.seen == []


@pytest.mark.parametrize("failure", ["raises", "cancelled"])
async def test_a_401_is_closed_when_its_renewal_fails(failure: str) -> None:
    """The 401 whose token is being renewed is closed on every path: the renewal raising
    UpstreamError, or the request cancelled meanwhile."""
    import asyncio

    from relay.errors import UpstreamError, UpstreamUnavailable
    from relay.http.authorize import mark_authorized
    from relay.net.upstream import Upstream

    closed: list[bool] = []

    class Body(httpx.AsyncByteStream):
        async def __aiter__(self):  # type: ignore[no-untyped-def]
            yield b"{}"

        async def aclose(self) -> None:
            closed.append(True)

    renewing = asyncio.Event()

    class Refusing:
        def known(self, mirror: int) -> str | None:
            return None

        async def renew(self, mirror: int, refused: httpx.Response) -> str:
            renewing.set()
            if failure == "raises":
                raise UpstreamUnavailable("the realm is down")
            await asyncio.Event().wait()
            raise AssertionError("not reached")

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"www-authenticate": "Bearer x"}, stream=Body())

    route = _route()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handle))
    upstream = Upstream(client, Config(routes=(route,)))
    for url in ("https://registry-a.test/v2/x/blobs/sha256:0", "https://elsewhere.test/x"):
        closed.clear()
        renewing.clear()
        request = upstream.build_request("GET", url, [], route)
        mark_authorized(request, Refusing())
        task = asyncio.ensure_future(upstream.open(request, route, background=True))
        if url.startswith("https://elsewhere"):  # not a mirror's: answered as it is
            response = await task
            assert response.status_code == 401
            await response.aclose()
            assert closed
            continue
        await renewing.wait()
        if failure == "cancelled":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(UpstreamError):
                await task
        assert closed == [True] * len(closed)
        assert closed


@pytest.mark.parametrize("cached", [True, False])
async def test_a_realm_that_times_out_is_waited_for_once_per_pull(
    tmp_path: Path, cached: bool
) -> None:
    """Registry a's realm stops answering (a timeout) once its challenge is known: the pull
    goes on to b after one wait for it, not two (the token asked for before the request,
    then again after a's 401), and a rests as any failing mirror does."""
    a, b = _registries()
    _same_image(a, b)
    other = LAYER[::-1]
    _, layer = a.add_image("library/busybox", "1", other)
    b.add_image("library/busybox", "1", other)
    answer = a.handle

    def hanging(request: httpx.Request) -> httpx.Response:
        if request.url.host == "auth-a.test" and "busybox" in request.url.params.get("scope", ""):
            a.seen.append(request)
            raise httpx.ReadTimeout("the realm does not answer", request=request)
        return answer(request)

    a.handle = hanging  # type: ignore[method-assign]
    mirror = _mirror(tmp_path, a, b, cached=cached)
    async with mirror.running():
        assert (await mirror.get("/v2/library/alpine/manifests/3")).status == 200
        client = await mirror.get(f"/v2/library/busybox/blobs/{layer}")
        assert client.status == 200, client.body
        assert client.body == other
        assert len(a.requests(host="auth-a.test", part="/token")) == 2  # alpine's, busybox's


async def test_a_registry_naming_anothers_realm_never_gets_the_others_account(
    tmp_path: Path,
) -> None:
    """redirect_hosts are the route's: registry b may name registry a's realm there (b's own
    account, here none, goes with it), but a's account goes only with a's own requests."""
    a, b = _registries()
    b.realm = "https://auth-a.test/token"
    _, layer = _same_image(a, b)
    a.down = True
    route = _route(
        RouteMirror(url="https://registry-a.test/", username_env="A_USER", password_env="A_PASS"),
        "https://registry-b.test/",
        max_fails=0,
    ).resolve_credential({"A_USER": "user", "A_PASS": "pass"})
    async with Mirror(cached_config(tmp_path, route), a, b).running() as mirror:
        mirror.registries = {"registry-b.test": b, "auth-a.test": b, "registry-a.test": a}
        client = await mirror.get(f"/v2/library/alpine/blobs/{layer}")
        assert client.status == 200  # b's token, from a's realm: anonymous
    realm = b.requests(host="auth-a.test")
    assert realm
    assert all("authorization" not in r.headers for r in realm)


@pytest.mark.parametrize("cached", [True, False])
async def test_a_realm_refusing_one_clients_scope_does_not_rest_the_registry(
    tmp_path: Path, cached: bool
) -> None:
    """Each realm refuses (403) a token for a repository relay's account may not pull: that
    is an answer about the client's name, not the registry's health. A client asking for it
    again and again does not make the registries rest (the route answering 503 to all)."""
    a, b = _registries()
    _, layer = _same_image(a, b)

    def refusing(registry: FakeRegistry) -> None:
        answer = registry.handle

        def handle(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/token" and "private" in request.url.params.get("scope", ""):
                registry.seen.append(request)
                return httpx.Response(403, json={"details": "access denied"})
            return answer(request)

        registry.handle = handle  # type: ignore[method-assign]

    refusing(a)
    refusing(b)
    mirror = _mirror(tmp_path, a, b, cached=cached)  # max_fails = 1
    async with mirror.running():
        assert (await mirror.get("/v2/library/alpine/manifests/3")).status == 200
        for _ in range(3):
            refused = await mirror.get(f"/v2/library/private/blobs/{layer}")
            assert 400 <= refused.status < 600
        client = await mirror.get(f"/v2/library/alpine/blobs/{layer}")
        assert client.status == 200, client.body
        assert client.body == LAYER
        assert a.requests(host="registry-a.test", part="/alpine/blobs/")  # a did not rest


async def test_while_the_first_registry_rests_nothing_is_asked_for_it(tmp_path: Path) -> None:
    """Registry a is down and resting: each cold blob goes to b with b's token, and neither a
    nor b's `/v2/` is probed again for a's sake on every fill."""
    a, b = _registries()
    blobs = [bytes([n]) * 4096 for n in range(4)]
    for body in blobs:
        a.add_blob(body)
        b.add_blob(body)
    a.down = True
    mirror = _mirror(tmp_path, a, b, fail_timeout=600)
    async with mirror.running():
        for body in blobs:
            client = await mirror.get(f"/v2/library/alpine/blobs/{digest_of(body)}")
            assert client.status == 200
            assert client.body == body
    assert len(a.seen) == 1  # the first fill's probe found it down; then it rested
    assert len([r for r in b.seen if r.url.path == "/v2/"]) <= 1
    assert len(b.requests(host="auth-b.test")) == 1  # one token for the scope, kept
