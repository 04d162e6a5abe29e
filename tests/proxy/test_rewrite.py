from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.config import Route
from relay.net.presets import is_immutable
from relay.proxy.rewrite import RewrittenBody, UrlRewriter, public_base

PAIRS = [
    (b"https://files.example/", b"http://relay:8080/pyfiles/"),
    (b"https://files.example/deep/", b"http://relay:8080/deep/"),
]
TEXT = (
    b'<a href="https://files.example/p/a.whl#sha256=ab">a</a>'
    b'<a href="https://files.example/deep/b.whl">b</a>https://files.example.evil/x '
    b"https://files.example/"
)
WANT = (
    b'<a href="http://relay:8080/pyfiles/p/a.whl#sha256=ab">a</a>'
    b'<a href="http://relay:8080/deep/b.whl">b</a>https://files.example.evil/x '
    b"http://relay:8080/pyfiles/"
)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 21, 22, 23, 50, len(TEXT)])
def test_rewrite_is_independent_of_chunk_boundaries(size: int) -> None:
    rewriter = UrlRewriter(PAIRS)
    out = b"".join(rewriter.feed(TEXT[i : i + size]) for i in range(0, len(TEXT), size))
    assert out + rewriter.flush() == WANT


def test_rewrite_holds_back_at_most_the_longest_prefix() -> None:
    rewriter = UrlRewriter(PAIRS)
    chunk = b"x" * 1000
    assert len(rewriter.feed(chunk)) == 1000 - (len(PAIRS[1][0]) - 1)


def test_rewritten_body_iterates_and_flushes() -> None:
    async def raw() -> AsyncIterator[bytes]:
        for i in range(0, len(TEXT), 5):
            yield TEXT[i : i + 5]

    async def collect() -> bytes:
        return b"".join([c async for c in RewrittenBody(raw(), UrlRewriter(PAIRS))])

    assert asyncio.run(collect()) == WANT


def test_public_base() -> None:
    assert (
        public_base([("x-forwarded-proto", "https"), ("x-forwarded-host", "r:8")]) == "https://r:8"
    )
    assert public_base([("x-forwarded-proto", "http")]) == ""
    assert public_base([("x-forwarded-proto", "http"), ("x-forwarded-host", 'a"><x')]) == ""


def test_immutable_marker() -> None:
    files = Route(prefix="/f/", upstream="https://files.example/", immutable=True)
    npm = Route(prefix="/npm/", upstream="https://registry.example/", preset="npm")
    hf = Route(
        prefix="/hf/",
        upstream="https://hub.example/",
        preset="hf",
        redirects="follow",
        redirect_hosts=("cdn.example",),
    )
    assert is_immutable(files, "packages/a.whl")
    assert is_immutable(npm, "left-pad/-/left-pad-1.3.0.tgz")
    assert not is_immutable(npm, "left-pad")
    assert not is_immutable(npm, "x/-/x-1.tgz", "application/json")
    assert is_immutable(hf, "org/m/resolve/" + "a" * 40 + "/model.bin")
    assert not is_immutable(hf, "org/m/resolve/main/model.bin")
