"""Raw-path mapping: stays under the route's base, refuses traversal in every spelling."""

from __future__ import annotations

import pytest

from relay.config import Route
from relay.errors import BadPath, NoRoute
from relay.net.routing import RouteTable

TABLE = RouteTable(
    (
        Route(prefix="/gh/", upstream="https://github.com/"),
        Route(prefix="/gh/special/", upstream="https://special.example/v2"),
        Route(prefix="/models", upstream="https://models.example.com/v1/"),
    )
)


@pytest.mark.parametrize(
    ("raw", "query", "url"),
    [
        (
            b"/gh/org/repo/releases/download/v1/big.tar.gz",
            b"",
            "https://github.com/org/repo/releases/download/v1/big.tar.gz",
        ),
        (b"/gh/", b"", "https://github.com/"),
        (b"/gh/a/b/", b"", "https://github.com/a/b/"),
        (b"/gh/special/x", b"", "https://special.example/v2/x"),
        (b"/models/m.bin", b"sig=a%2Fb&e=1", "https://models.example.com/v1/m.bin?sig=a%2Fb&e=1"),
        (
            b"/gh/%40types/node/-/node-1.0.0.tgz",
            b"",
            "https://github.com/%40types/node/-/node-1.0.0.tgz",
        ),
        (b"/gh/@types/node", b"", "https://github.com/@types/node"),
        (b"/gh/file%20name.bin", b"", "https://github.com/file%20name.bin"),
        (b"/gh/a..b/c...d", b"", "https://github.com/a..b/c...d"),
    ],
)
def test_paths_map_below_the_base(raw: bytes, query: bytes, url: str) -> None:
    assert TABLE.resolve(raw, query).url == url


@pytest.mark.parametrize(
    "raw",
    [
        b"/gh/../etc/passwd",
        b"/gh/a/../../x",
        b"/gh/./x",
        b"/gh/%2e%2e/x",
        b"/gh/%2E%2E/x",
        b"/gh/.%2e/x",
        b"/gh/%2e/x",
        b"/gh/..%2Fx",
        b"/gh/..%2fx",
        b"/gh/a%2Fb",
        b"/gh/%252e%252e/x",
        b"/gh/%25/x",
        b"/gh/a\\..\\b",
        b"/gh/a%5c..%5cb",
        b"/gh/a%5C..",
        b"/gh/a%00b",
        b"/gh/a\x00b",
        b"/gh//evil/x",
        b"//evil/x",
        b"/gh/..;/x",
        b"/gh/%2e%2e;x/y",
        b"/gh/a b",
        b"/gh/a%zz",
        b"/gh/a%4",
        b"/gh/\xc3\xa9",
        b"/gh/a%0d%0aX-Injected:1",
        b"gh/x",
        b"http://evil/gh/x",
    ],
)
def test_traversal_and_bad_encodings_are_refused(raw: bytes) -> None:
    with pytest.raises(BadPath):
        TABLE.resolve(raw)


@pytest.mark.parametrize("query", [b"a=b c", b"a=\x00", b"a=#frag", b"x=\xff"])
def test_bad_query_bytes_are_refused(query: bytes) -> None:
    with pytest.raises(BadPath):
        TABLE.resolve(b"/gh/x", query)


@pytest.mark.parametrize("raw", [b"/", b"/g", b"/gh", b"/ghx/y", b"/GH/x", b"/models2/x"])
def test_unconfigured_paths_are_404(raw: bytes) -> None:
    with pytest.raises(NoRoute):
        TABLE.resolve(raw)


def test_longest_prefix_wins() -> None:
    assert TABLE.resolve(b"/gh/special/a").route.prefix == "/gh/special/"
    assert TABLE.resolve(b"/gh/specialx/a").route.prefix == "/gh/"


def test_root_route_serves_everything_but_still_refuses_double_slash() -> None:
    table = RouteTable((Route(prefix="/", upstream="https://up.example/base"),))
    assert table.resolve(b"/a/b").url == "https://up.example/base/a/b"
    with pytest.raises(BadPath):
        table.resolve(b"//evil.example/x")


NPM = RouteTable((Route(prefix="/npm/", upstream="https://registry.npmjs.org/", preset="npm"),))


@pytest.mark.parametrize(
    ("raw", "url"),
    [
        (b"/npm/@types%2fnode", "https://registry.npmjs.org/@types%2fnode"),
        (b"/npm/@babel%2Fcore", "https://registry.npmjs.org/@babel%2Fcore"),
        (
            b"/npm/@types%2fnode/-/node-20.0.0.tgz",
            "https://registry.npmjs.org/@types%2fnode/-/node-20.0.0.tgz",
        ),
    ],
)
def test_npm_scoped_package_names_pass_on_an_npm_route(raw: bytes, url: str) -> None:
    assert NPM.resolve(raw).url == url


@pytest.mark.parametrize(
    "raw",
    [
        b"/npm/@types%2f..",  # the name part may not start with '.'
        b"/npm/@..%2fx",
        b"/npm/@types%2f",
        b"/npm/%2fetc",
        b"/npm/x/@types%2fnode",  # only the first segment
        b"/npm/@types%2fnode%2fx",
        b"/npm/@types%2fnode/..%2fx",
    ],
)
def test_encoded_slashes_stay_refused_outside_the_npm_scoped_name(raw: bytes) -> None:
    with pytest.raises(BadPath):
        NPM.resolve(raw)


def test_npm_scoped_form_is_refused_on_other_routes() -> None:
    with pytest.raises(BadPath):
        RouteTable((Route(prefix="/o/", upstream="https://example.com/"),)).resolve(
            b"/o/@types%2fnode"
        )
