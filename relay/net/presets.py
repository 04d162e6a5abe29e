"""Package-ecosystem presets of a route (`preset = "pypi" | "npm" | "hf"`): the facts about
each ecosystem that relaying (relay/proxy/rewrite.py) and caching both need.

- Which answers are index pages (rewritten by relay, fresh only as long as the upstream says)
  and which are immutable files (a wheel, a tarball, an LFS object): `is_immutable`.
- What of a request's Accept selects an index page's form (PEP 691: JSON or HTML; npm: the
  abbreviated or the full packument): `index_accept`, the cache's variant of a page.
- The Hub's file-metadata headers, kept through a followed redirect, and Xet's, withheld.
"""

from __future__ import annotations

import re

from relay.config import Route

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
_PYPI_FILE = re.compile(r"\.(whl|tar\.gz|zip|tar\.bz2|egg|metadata)$")


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
    return False


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
