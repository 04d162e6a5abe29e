from __future__ import annotations

import httpx

from relay.config import Route
from relay.net.presets import (
    hub_metadata,
    index_accept,
    is_hub_file,
    is_immutable,
    linked_sha256,
    revalidated,
    without_xet,
)

HF = Route(
    prefix="/hf/",
    upstream="https://hub.example/",
    preset="hf",
    redirects="follow",
    redirect_hosts=("cdn.example",),
)
SHA = "ab" * 32

PYPI = Route(prefix="/pypi/", upstream="https://pypi.example/", preset="pypi")
NPM = Route(prefix="/npm/", upstream="https://npm.example/", preset="npm")

JSON = "application/vnd.pypi.simple.v1+json"
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)


def test_index_accept_keeps_the_presets_media_ranges_with_their_q() -> None:
    assert index_accept(PYPI, PIP_ACCEPT) == (
        "application/vnd.pypi.simple.v1+json,application/vnd.pypi.simple.v1+html;q=0.1,"
        "text/html;q=0.01"
    )


def test_index_accept_normalises_spelling_but_not_meaning() -> None:
    """Case, spaces, q=1 spelled out, other parameters and unknown types do not split a
    page's variant; q-values and order (a tie-break) do."""
    same = "Application/VND.pypi.simple.v1+JSON;q=1.0 ;charset=utf-8,image/png,text/html;q=0.010"
    assert index_accept(PYPI, same) == index_accept(
        PYPI, "application/vnd.pypi.simple.v1+json, text/html;q=0.01"
    )
    assert index_accept(PYPI, "text/html") != index_accept(PYPI, PIP_ACCEPT)
    assert index_accept(PYPI, "text/html;q=0.5") != index_accept(PYPI, "text/html")
    assert index_accept(PYPI, f"text/html, {JSON}") != index_accept(PYPI, f"{JSON}, text/html")


def test_index_accept_keeps_wildcards_and_q_zero() -> None:
    assert index_accept(PYPI, "*/*") == "*/*"
    assert index_accept(PYPI, "text/html;q=0, */*;q=0.5") == "text/html;q=0,*/*;q=0.5"
    assert index_accept(PYPI, None) == ""
    assert index_accept(PYPI, "text/html;q=junk") == "text/html"


def test_index_accept_per_preset() -> None:
    npm = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
    assert index_accept(NPM, npm) == (
        "application/vnd.npm.install-v1+json,application/json;q=0.8,*/*"
    )
    # An npm route does not know PyPI's types.
    assert index_accept(NPM, "application/vnd.pypi.simple.v1+json") == ""


def test_hub_file_paths() -> None:
    """A file of a repo at a revision (models, datasets, spaces); nothing else, and only on an
    hf route."""
    assert is_hub_file(HF, "org/m/resolve/main/model.bin")
    assert is_hub_file(HF, "datasets/org/d/resolve/" + "a" * 40 + "/data/train.parquet")
    assert is_hub_file(HF, "org/m/resolve/refs%2Fpr%2F1/model.bin?download=true")
    assert not is_hub_file(HF, "api/models/org/m")
    assert not is_hub_file(HF, "org/m/resolve/main/")
    assert not is_hub_file(HF, "org/m/blob/main/model.bin")
    plain = Route(prefix="/p/", upstream="https://hub.example/")
    assert not is_hub_file(plain, "org/m/resolve/main/model.bin")


def test_linked_sha256_takes_quoted_and_weak_forms_only_of_64_hex() -> None:
    for value in (SHA, f'"{SHA}"', f'W/"{SHA}"', f'"{SHA.upper()}"'):
        assert linked_sha256(httpx.Headers({"x-linked-etag": value})) == SHA
    for value in ('"abc"', '"' + "g" * 64 + '"', '"' + "a" * 40 + '"', ""):
        assert linked_sha256(httpx.Headers({"x-linked-etag": value})) is None
    assert linked_sha256(httpx.Headers({"etag": f'"{SHA}"'})) is None


def test_without_xet_drops_xet_headers_and_the_xet_auth_link_only() -> None:
    headers = [
        (b"x-xet-hash", b"f" * 64),
        (b"x-xet-refresh-route", b"/api/x"),
        (b"link", b'<https://hub.example/t>; rel="xet-auth", <https://hub.example/n>; rel="next"'),
        (b"link", b"<https://hub.example/t>; rel=xet-auth"),
        (b"etag", b'"e"'),
    ]
    assert without_xet(headers) == [
        (b"link", b'<https://hub.example/n>; rel="next"'),
        (b"etag", b'"e"'),
    ]


def test_hub_metadata_comes_from_the_last_hop_with_a_commit_and_never_doubles() -> None:
    first = httpx.Headers({"x-repo-commit": "c1", "x-linked-etag": f'"{SHA}"'})
    second = httpx.Headers({"x-repo-commit": "c2", "x-linked-size": "9"})
    cdn = httpx.Headers({"etag": '"cdn"'})
    assert hub_metadata([first, second, cdn], set()) == [
        (b"x-repo-commit", b"c2"),
        (b"x-linked-size", b"9"),
    ]
    assert hub_metadata([first], {b"x-repo-commit"}) == [(b"x-linked-etag", f'"{SHA}"'.encode())]
    assert hub_metadata([cdn], set()) == []


DEBIAN = Route(prefix="/debian/", upstream="https://deb.example/debian/", preset="debian")


def test_debian_pool_and_by_hash_files_are_immutable_and_dists_revalidated() -> None:
    immutable = [
        "pool/main/h/hello/hello_2.10-3_amd64.deb",
        "pool/main/h/hello/hello_2.10-3.dsc",
        f"dists/bookworm/main/binary-amd64/by-hash/SHA256/{SHA}",
        f"dists/bookworm/main/i18n/by-hash/SHA256/{SHA}",
    ]
    metadata = [
        "dists/bookworm/InRelease",
        "dists/bookworm/Release",
        "dists/bookworm/Release.gpg",
        "dists/bookworm/main/binary-amd64/Packages.xz",
        "dists/bookworm/main/source/Sources.gz",
        "dists/bookworm/main/Contents-amd64.gz",
        "dists/bookworm/main/i18n/Translation-en.bz2",
        "dists/bookworm/main/binary-amd64/Packages.diff/Index",
    ]
    for path in immutable:
        assert is_immutable(DEBIAN, path), path
        assert not revalidated(DEBIAN, path), path
    for path in metadata:
        assert not is_immutable(DEBIAN, path), path
        assert revalidated(DEBIAN, path), path
    assert not is_immutable(DEBIAN, "README")
    assert not revalidated(DEBIAN, "README")
    # Only the debian preset says so.
    plain = Route(prefix="/d/", upstream="https://deb.example/debian/")
    assert not is_immutable(plain, immutable[0])
    assert not revalidated(plain, metadata[0])
