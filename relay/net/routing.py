"""Mapping a raw request path onto an upstream URL, refusing anything that could escape it.

The mapping works on the raw path bytes, never on a decoded path and never with `urljoin`
(which switches host on `//evil`). Every segment is percent-decoded once, only to be checked:
the bytes sent upstream are the client's own.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from relay.config import Route
from relay.errors import BadPath, NoRoute

# RFC 3986 pchar plus "/"; "%" only as the start of a valid escape (checked separately).
_PATH_BYTES = re.compile(rb"^[A-Za-z0-9._~!$&'()*+,;=:@/%-]*$")
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# Printable ASCII without space and '#'.
_QUERY_BYTES = re.compile(rb"^[!-\"$-~]*$")
# After decoding a segment, none of these may appear: a separator, a second round of
# escaping, NUL or other control characters.
_FORBIDDEN_DECODED = re.compile(rb"[/\\%\x00-\x1f\x7f]")
# Look-alikes of '.', '/' and '\\' that a lenient upstream may fold into them. Every character
# whose NFKC form contains one is refused (fullwidth full stop and solidus, one- and two-dot
# leaders, ellipsis, small full stop, fullwidth and small reverse solidus...); these slashes
# have no compatibility decomposition, so they are named: division slash, fraction slash,
# set minus, reverse solidus operator, big (reverse) solidus, box-drawing diagonals.
_SEPARATOR_LOOKALIKES = frozenset("\u2215\u2044\u2216\u29f5\u29f8\u29f9\u2571\u2572")
# npm asks for a scoped package as one segment with an encoded slash, `@scope%2fname`. Allowed
# as the first segment of an npm preset route only, in exactly this form: neither part can be
# empty or start with '.', so once the registry decodes it, it is two plain segments.
_NPM_SCOPED = re.compile(rb"^@[A-Za-z0-9~-][A-Za-z0-9._~-]*%2[fF][A-Za-z0-9~-][A-Za-z0-9._~-]*$")


@dataclass(frozen=True, slots=True)
class Target:
    route: Route
    rest: str = ""
    """The request path after the route's prefix, as the client sent it."""
    query: str | None = None

    @property
    def url(self) -> str:
        """The upstream URL: the route's upstream base, the rest of the path, the query."""
        url = self.route.upstream + self.rest
        return url if self.query is None else f"{url}?{self.query}"


class RouteTable:
    def __init__(self, routes: tuple[Route, ...]) -> None:
        # Longest prefix first, so /a/b/ wins over /a/.
        self._routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self._prefixes = [(r.prefix.encode("ascii"), r) for r in self._routes]
        bases = [(m.url, r) for r in routes for m in r.upstreams]
        self._by_upstream = sorted(bases, key=lambda pair: len(pair[0]), reverse=True)

    def by_upstream(self) -> list[tuple[str, Route]]:
        """Every upstream base (each mirror's) with its route, the longest base first."""
        return self._by_upstream

    def resolve(self, raw_path: bytes, query_string: bytes = b"") -> Target:
        if not raw_path.startswith(b"/") or raw_path.startswith(b"//"):
            raise BadPath("request target must be a path starting with a single '/'")
        route = next((r for p, r in self._prefixes if raw_path.startswith(p)), None)
        if route is None:
            raise NoRoute("no route for this path")
        rest = raw_path[len(route.prefix) :]
        scoped, _, after = rest.partition(b"/")
        if route.preset == "npm" and _NPM_SCOPED.match(scoped):
            check_relative_path(after)
        else:
            check_relative_path(rest)
        query = None
        if query_string:
            if not _QUERY_BYTES.match(query_string):
                raise BadPath("query string has characters that must be percent-encoded")
            query = query_string.decode("ascii")
        return Target(route=route, rest=rest.decode("ascii"), query=query)


def check_relative_path(rest: bytes) -> None:
    """Refuse a path remainder that could leave the route's base once an upstream decodes it."""
    if not _PATH_BYTES.match(rest):
        raise BadPath("path has characters that must be percent-encoded (e.g. '\\', space, NUL)")
    if b"%" in rest and _BAD_ESCAPE.search(rest):
        raise BadPath("path has a malformed percent-escape")
    segments = rest.split(b"/")
    for i, segment in enumerate(segments):
        if not segment:
            if i == len(segments) - 1:
                continue  # a trailing slash
            raise BadPath("path has an empty segment ('//')")
        decoded = _ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), segment)
        if _FORBIDDEN_DECODED.search(decoded):
            raise BadPath(
                "path segment decodes to a separator, control character or another escape"
            )
        if not decoded.isascii():
            _check_non_ascii(decoded)
        # "..;x" is ".." to servlet containers; judge the segment without its parameters.
        if decoded.split(b";", 1)[0] in (b".", b".."):
            raise BadPath("path has a '.' or '..' segment")


def _check_non_ascii(decoded: bytes) -> None:
    """Refuse escapes that are not UTF-8 (overlong `%c0%ae` is a '.' to some decoders) and
    Unicode look-alikes of '.', '/' and '\\' (`%ef%bc%8e%ef%bc%8e` is '..' after NFKC)."""
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath("path has percent-escapes that are not valid UTF-8") from None
    for char in text:
        if char.isascii():
            continue
        if char in _SEPARATOR_LOOKALIKES or any(
            c in "./\\" for c in unicodedata.normalize("NFKC", char)
        ):
            raise BadPath("path has a Unicode look-alike of '.', '/' or '\\'")
