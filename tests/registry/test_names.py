"""Which route and repository a registry request names (relay.registry.names): strict,
bounded parsing, `ns` only ever selecting a configured route."""

from __future__ import annotations

import pytest

from relay.registry.errors import RegistryError
from relay.registry.names import claims, parse
from tests.registry.mirror import oci_route

HUB = oci_route("/dockerhub/", registry_hosts=("docker.io",), registry_default=True)
GHCR = oci_route("/ghcr/", "https://ghcr.test/")
ROUTES = (HUB, GHCR)
DIGEST = "sha256:" + "ab" * 32


def _parse(path: str, query: bytes = b"", method: str = "GET") -> tuple[str, str, str, str]:
    request = parse(method, path.encode(), query, ROUTES)
    assert request.route is not None
    return request.kind, request.route.prefix, request.name, request.reference


def _code(path: str, query: bytes = b"", method: str = "GET") -> tuple[int, str]:
    with pytest.raises(RegistryError) as caught:
        parse(method, path.encode(), query, ROUTES)
    return caught.value.status_code, caught.value.code


def test_ns_selects_the_route_mirroring_that_registry() -> None:
    assert _parse("/v2/library/alpine/manifests/3.20", b"ns=docker.io") == (
        "manifest",
        "/dockerhub/",
        "library/alpine",
        "3.20",
    )
    assert _parse("/v2/org/app/blobs/" + DIGEST, b"ns=ghcr.test")[:3] == (
        "blob",
        "/ghcr/",
        "org/app",
    )


def test_ns_is_authoritative_the_name_is_taken_whole() -> None:
    """With ns=, a first component equal to a route's name is part of the repository."""
    assert _parse("/v2/ghcr/x/manifests/v1", b"ns=docker.io")[1:3] == ("/dockerhub/", "ghcr/x")


def test_an_ns_no_route_mirrors_is_name_unknown_never_a_host_to_reach() -> None:
    assert _code("/v2/library/alpine/manifests/1", b"ns=evil.example") == (404, "NAME_UNKNOWN")
    assert _code("/v2/library/alpine/manifests/1", b"ns=127.0.0.1:22") == (404, "NAME_UNKNOWN")
    assert _code("/v2/library/alpine/manifests/1", b"ns=a%2Fb") == (400, "NAME_INVALID")
    assert _code("/v2/a/manifests/1", b"ns=docker.io&ns=ghcr.test") == (400, "NAME_INVALID")


def test_a_route_name_prefix_selects_its_route_and_is_stripped() -> None:
    assert _parse("/v2/ghcr/org/app/manifests/v1")[1:3] == ("/ghcr/", "org/app")
    assert _parse("/v2/dockerhub/library/alpine/tags/list")[:3] == (
        "tags",
        "/dockerhub/",
        "library/alpine",
    )


def test_a_route_own_v2_path_selects_it() -> None:
    assert _parse("/ghcr/v2/org/app/manifests/v1")[1:3] == ("/ghcr/", "org/app")
    assert _code("/ghcr/v2/org/app/manifests/v1", b"ns=docker.io") == (404, "NAME_UNKNOWN")
    assert _parse("/ghcr/v2/org/app/manifests/v1", b"ns=ghcr.test")[1] == "/ghcr/"


def test_without_ns_or_prefix_the_default_route_answers() -> None:
    assert _parse("/v2/library/alpine/manifests/latest")[1:3] == ("/dockerhub/", "library/alpine")
    with pytest.raises(RegistryError) as caught:
        parse("GET", b"/v2/library/alpine/manifests/latest", b"", (GHCR,))
    assert caught.value.code == "NAME_UNKNOWN"


@pytest.mark.parametrize(
    "name",
    [
        "Library/alpine",
        "a//b",
        "a/../b",
        "-a",
        "a-",
        "a/.b",
        "a%2fb",
        "a b",
        "a\\b",
        "x" * 256,
        "a/",
    ],
)
def test_invalid_repository_names_are_name_invalid(name: str) -> None:
    status, code = _code(f"/v2/{name}/manifests/latest", b"ns=docker.io")
    assert status in (400, 404)
    assert code in ("NAME_INVALID", "NAME_UNKNOWN")


def test_valid_repository_names() -> None:
    for name in ("a", "a/b/c", "a.b", "a_b", "a__b", "a---b", "0/9"):
        assert _parse(f"/v2/{name}/manifests/1", b"ns=docker.io")[2] == name


def test_digests_are_sha256_and_64_lowercase_hex_only() -> None:
    assert _parse("/v2/a/manifests/" + DIGEST)[3] == DIGEST
    assert _code("/v2/a/blobs/sha512:" + "ab" * 64) == (400, "DIGEST_INVALID")
    assert _code("/v2/a/blobs/sha256:" + "AB" * 32) == (400, "DIGEST_INVALID")
    assert _code("/v2/a/blobs/sha256:" + "ab" * 31) == (400, "DIGEST_INVALID")
    assert _code("/v2/a/blobs/latest") == (400, "DIGEST_INVALID")
    assert _code("/v2/a/referrers/sha384:" + "ab" * 48) == (400, "DIGEST_INVALID")


def test_tags_are_checked() -> None:
    assert _parse("/v2/a/manifests/v1.2_3-x")[3] == "v1.2_3-x"
    assert _code("/v2/a/manifests/.hidden") == (400, "TAG_INVALID")
    assert _code("/v2/a/manifests/" + "t" * 129) == (400, "TAG_INVALID")


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_writes_are_unsupported(method: str) -> None:
    assert _code("/v2/a/blobs/uploads/", method=method) == (405, "UNSUPPORTED")
    assert _code("/v2/a/manifests/latest", method=method) == (405, "UNSUPPORTED")


def test_an_upload_session_is_unsupported_even_read() -> None:
    assert _code("/v2/a/blobs/uploads/1234") == (405, "UNSUPPORTED")


def test_tags_list_query_is_checked_and_rebuilt() -> None:
    request = parse("GET", b"/v2/a/tags/list", b"n=10&last=v1&other=x", ROUTES)
    assert request.query == "n=10&last=v1"
    assert _code("/v2/a/tags/list", b"n=ten") == (400, "PAGINATION_NUMBER_INVALID")


def test_the_registry_claims_its_paths_only() -> None:
    assert claims("/v2/", ROUTES)
    assert claims("/v2", ROUTES)
    assert claims("/ghcr/v2/x", ROUTES)
    assert not claims("/ghcr/v2x", ROUTES)
    assert not claims("/v20/x", ROUTES)
    assert not claims("/other/", ROUTES)
