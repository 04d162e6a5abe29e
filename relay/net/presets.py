"""Package-ecosystem presets of a route (`preset = "pypi" | "npm" | "hf" | "debian"`): the
facts about each ecosystem that relaying (relay/proxy/rewrite.py) and caching both need.

- Which answers are index pages (rewritten by relay, fresh only as long as the upstream says)
  and which are immutable files (a wheel, a tarball, an LFS object, a Debian `pool/` or
  `by-hash/` file): `is_immutable`; which are metadata revalidated by every request, so that
  a mirror's update is seen at once (a Debian archive's `dists/`): `revalidated`.
- What of a request's Accept selects an index page's form (PEP 691: JSON or HTML; npm: the
  abbreviated or the full packument): `index_accept`, the cache's variant of a page.
- The Hub's file-metadata headers, kept through a followed redirect, and Xet's, withheld.
- Which Hub paths are file downloads (`<repo>/resolve/<rev>/<file>`), and when the Hub's
  answer names the file's bytes by their sha256 (`X-Linked-Etag`): the cache keys those bytes
  by that digest (relay/cache/hub.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import httpx

from relay.config import Route
from relay.types import RawHeaders

# Media types whose bodies a preset rewrites (parameters such as charset ignored).
INDEX_TYPES: dict[str, frozenset[str]] = {
    "pypi": frozenset(
        {
            "text/html",
            "application/vnd.pypi.simple.v1+html",
            "application/vnd.pypi.simple.v1+json",
            "application/vnd.pypi.simple.latest+json",
            "application/vnd.pypi.simple.latest+html",
            "application/json",
        }
    ),
    "npm": frozenset(
        {"application/json", "application/vnd.npm.install-v1+json", "application/x-json"}
    ),
}

# huggingface_hub keys its cache by these; a followed redirect's final answer lacks them.
HF_METADATA_HEADERS = ("x-repo-commit", "x-linked-etag", "x-linked-size")

# huggingface_hub switches to Xet storage (another host, not through relay) when it sees an
# X-Xet-Hash with a refresh route (X-Xet-Refresh-Route or a Link rel="xet-auth"): withheld.
XET_HEADER_PREFIX = b"x-xet-"

# Media ranges that stand for every index type of a preset.
_WILDCARDS = frozenset({"*/*", "text/*", "application/*"})

_NPM_TARBALL = re.compile(r"(^|/)-/[^/]+\.tgz$")
_HF_PINNED = re.compile(r"^(?:[^/]+/)*[^/]+/[^/]+/resolve/[0-9a-f]{40}/")
_HF_RESOLVE = re.compile(r"^(?:[^/]+/)*[^/]+/[^/]+/resolve/[^/]+/[^?]+")
_LINK_SPLIT = re.compile(r",\s*(?=<)")
_XET_AUTH = re.compile(r'rel\s*=\s*"?xet-auth"?', re.I)
_PYPI_FILE = re.compile(r"\.(whl|tar\.gz|zip|tar\.bz2|egg|metadata)$")
# A Debian archive: packages in pool/ never change under their versioned names; by-hash/ files
# are named by their digest; the rest of dists/ (InRelease, Release, Release.gpg, Packages*,
# Sources*, Contents*, Translation*, pdiff indexes) changes with every archive update.
_DEBIAN_IMMUTABLE = re.compile(r"^(?:pool/|dists/(?:[^/]+/)+by-hash/)")
_DEBIAN_METADATA = re.compile(r"^dists/")


def rewrites(route: Route) -> bool:
    return route.preset in INDEX_TYPES


def is_index_type(route: Route, content_type: str) -> bool:
    types = INDEX_TYPES.get(route.preset)
    if types is None:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media in types


def is_immutable(route: Route, rest: str, content_type: str = "") -> bool:
    """Whether a 200 answer for `rest` (the path below the route's prefix) is an immutable
    file that a cache may keep without revalidating, as opposed to an index page or metadata
    that follows the upstream's freshness.

    `immutable = true` marks a whole route (a files host, a CDN). Otherwise: npm tarballs
    (`<name>/-/<name>-<version>.tgz`), PyPI file names and Hub files resolved at a commit
    hash (`<repo>/resolve/<40 hex>/<file>`); an index media type never is.
    """
    path = rest.split("?", 1)[0]
    if content_type and is_index_type(route, content_type):
        return False
    if route.immutable:
        return True
    if route.preset == "npm":
        return bool(_NPM_TARBALL.search(path))
    if route.preset == "pypi":
        return bool(_PYPI_FILE.search(path))
    if route.preset == "hf":
        return bool(_HF_PINNED.match(path))
    if route.preset == "debian":
        return bool(_DEBIAN_IMMUTABLE.match(path))
    return False


def revalidated(route: Route, rest: str) -> bool:
    """Whether a cached answer for `rest` is revalidated by every request, whatever lifetime
    its upstream gives: a Debian archive's metadata (`dists/`, but not `by-hash/`), so that
    `apt-get update` sees a mirror's update at once and never pairs a new Release with old
    indexes (a 304 makes it cheap)."""
    path = rest.split("?", 1)[0]
    return (
        route.preset == "debian"
        and bool(_DEBIAN_METADATA.match(path))
        and not _DEBIAN_IMMUTABLE.match(path)
    )


def index_accept(route: Route, accept: str | None) -> str:
    """`accept` reduced to what can select an index page's form: the media ranges the preset
    knows (its index types and the wildcards), lowercased, parameters other than q dropped,
    in the client's order. Two requests with the same value get the same page from the
    upstream, so a cache may share it between them (pip always sends one Accept)."""
    known = INDEX_TYPES.get(route.preset, frozenset()) | _WILDCARDS
    kept: list[str] = []
    for item in (accept or "").split(","):
        media, *params = (part.strip() for part in item.split(";"))
        media = media.lower()
        if media not in known:
            continue
        q = "1"
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = f"{float(value.strip()):g}"
                except ValueError:
                    q = "1"
        kept.append(media if q == "1" else f"{media};q={q}")
    return ",".join(kept)


def is_hub_file(route: Route, rest: str) -> bool:
    """Whether `rest` (below an `hf` route's prefix) asks for a file of a repo at a revision:
    `[datasets/|spaces/]<owner>/<name>/resolve/<revision>/<file>`."""
    return route.preset == "hf" and bool(_HF_RESOLVE.match(rest))


def linked_sha256(headers: httpx.Headers) -> str | None:
    """The Hub's `X-Linked-Etag` when it is a sha256 (an LFS object's; quotes and W/ ignored)."""
    value = headers.get("x-linked-etag", "").strip().removeprefix("W/").strip('"').lower()
    return value if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else None


def without_xet(headers: RawHeaders) -> RawHeaders:
    """The headers without Xet's (`X-Xet-*`, a `Link` with rel="xet-auth")."""
    out: RawHeaders = []
    for name, value in headers:
        if name.startswith(XET_HEADER_PREFIX):
            continue
        if name == b"link":
            links = _LINK_SPLIT.split(value.decode("latin-1"))
            kept = ", ".join(link for link in links if not _XET_AUTH.search(link))
            if kept:
                out.append((name, kept.encode("latin-1")))
            continue
        out.append((name, value))
    return out


def hub_metadata(hops: Sequence[httpx.Headers], present: set[bytes]) -> RawHeaders:
    """The Hub's file metadata (`X-Repo-Commit`, `X-Linked-Etag`, `X-Linked-Size`) from the
    last of `hops` (the Hub's answers, first first) that carries `X-Repo-Commit`, each header
    only where its name is not in `present`."""
    for hop in reversed(hops):
        if "x-repo-commit" in hop:
            return [
                (name.encode(), hop[name].encode("latin-1"))
                for name in HF_METADATA_HEADERS
                if name in hop and name.encode() not in present
            ]
    return []
