"""Which route and repository a registry request names, parsed strictly and bounded.

Four ways to name a registry, tried in this order:

1. `<route prefix>v2/<name>/...`: the route whose prefix the path starts with (containerd's
   hosts.toml with `[host."http://relay:8080/dockerhub"]`). An `ns` must be one of its hosts.
2. `/v2/<name>/...?ns=<registry>`: the oci route whose `registry_hosts` hold `ns` (containerd's
   hosts.toml mirror, which always sends `ns`). The name is taken whole: `ns` is authoritative.
3. `/v2/<route name>/<name>/...`: the oci route whose prefix (without its slashes) starts the
   name (registries.conf `location = "relay:8080/dockerhub"`, containerd's `override_path`).
4. `/v2/<name>/...`: the route with `registry_default` (docker's `registry-mirrors`).

`ns` only ever selects among configured routes: it never names a host to reach (not an open
proxy). Repository names follow the distribution grammar (lowercase components separated by
`.`, `_`, `__` or dashes, at most 255 characters); tags `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`;
digests `sha256:` + 64 lowercase hex only (another algorithm is DIGEST_INVALID). No escape is
accepted anywhere in a registry path: no valid name, tag or digest has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

from relay.config import Route
from relay.registry.errors import (
    RegistryError,
    digest_invalid,
    name_invalid,
    name_unknown,
    unsupported,
)

MAX_NAME = 255
MAX_PATH = 1024
_COMPONENT = r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*"
_NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
_OTHER_DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
_PATH = re.compile(r"[A-Za-z0-9._/:-]*")
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?")
_MEDIA_TYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
)
_API = re.compile(
    r"/(?P<name>.+)/(?:"
    r"(?P<manifests>manifests)/(?P<reference>[^/]+)"
    r"|(?P<blobs>blobs)/(?P<digest>[^/]+)"
    r"|(?P<tags>tags)/list"
    r"|(?P<referrers>referrers)/(?P<subject>[^/]+)"
    r"|(?P<uploads>blobs/uploads)(?:/.*)?"
    r")"
)
_QUERY_BYTES = re.compile(rb"[A-Za-z0-9._~%&=+:/-]*")
READ_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class RegistryRequest:
    """One parsed registry request."""

    kind: str
    """"base" (`/v2/`), "manifest", "blob", "tags" or "referrers"."""
    route: Route | None
    """The registry route (None only for "base" at `/v2/`)."""
    name: str = ""
    """The repository name upstream (without relay's name prefix)."""
    reference: str = ""
    """A tag, or a digest `sha256:<hex>`."""
    query: str = ""
    """The upstream query: checked `n`/`last` (tags), `artifactType` (referrers)."""
    path: str = ""
    """The client's own path (a tags list's `Link` points back at it)."""
    ns: str = ""

    @property
    def sha256(self) -> str | None:
        """The hex of a digest reference, None for a tag."""
        match = _SHA256.fullmatch(self.reference)
        return match.group(1) if match else None

    @property
    def scope(self) -> str:
        """The token scope a pull of this repository needs."""
        return f"repository:{self.name}:pull"

    @property
    def upstream_path(self) -> str:
        """The path of this request on the registry."""
        if self.kind == "manifest":
            return f"v2/{self.name}/manifests/{self.reference}"
        if self.kind == "blob":
            return f"v2/{self.name}/blobs/{self.reference}"
        if self.kind == "tags":
            return f"v2/{self.name}/tags/list"
        if self.kind == "referrers":
            return f"v2/{self.name}/referrers/{self.reference}"
        return "v2/"


def oci_routes(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    return tuple(route for route in routes if route.preset == "oci")


def claims(path: str, routes: tuple[Route, ...]) -> bool:
    """Whether `path` belongs to the registry API (`/v2`, `/v2/...`, `<oci prefix>v2[/...]`)."""
    if path == "/v2" or path.startswith("/v2/"):
        return True
    return any(path == r.prefix + "v2" or path.startswith(r.prefix + "v2/") for r in routes)


def parse(method: str, raw_path: bytes, query: bytes, routes: tuple[Route, ...]) -> RegistryRequest:
    """The request `method raw_path?query` names, against the oci `routes`; raises
    RegistryError (400 NAME_INVALID / DIGEST_INVALID, 404 NAME_UNKNOWN, 405 UNSUPPORTED)."""
    if len(raw_path) > MAX_PATH or not _PATH.fullmatch(raw_path.decode("latin-1")):
        raise name_invalid("registry paths hold only names, tags and digests (no escapes)")
    path = raw_path.decode("ascii")
    ns = _ns(query)
    named_by_path = next(
        (r for r in routes if path.startswith(r.prefix + "v2/") or path == r.prefix + "v2"),
        None,
    )
    if named_by_path is not None:
        api = path[len(named_by_path.prefix) + 2 :]
    elif path == "/v2" or path.startswith("/v2/"):
        api = path[3:]
    else:
        raise name_unknown("not a registry API path")
    if method not in READ_METHODS:
        raise unsupported("relay is a read-only registry mirror")
    if api in ("", "/"):
        return RegistryRequest("base", named_by_path, path=path, ns=ns)
    match = _API.fullmatch(api)
    if match is None:
        raise RegistryError(404, "NAME_UNKNOWN", "not a registry API path")
    if match["uploads"]:
        raise unsupported("relay is a read-only registry mirror")
    route, name = _route_of(match["name"], ns, named_by_path, routes)
    if len(name) > MAX_NAME or not _NAME.fullmatch(name):
        raise name_invalid(f"invalid repository name {name[:MAX_NAME]!r}")
    if match["manifests"]:
        reference = match["reference"]
        if ":" in reference:
            _check_digest(reference)
        elif not _TAG.fullmatch(reference):
            raise RegistryError(400, "TAG_INVALID", "invalid tag")
        return RegistryRequest("manifest", route, name, reference, path=path, ns=ns)
    if match["blobs"]:
        _check_digest(match["digest"])
        return RegistryRequest("blob", route, name, match["digest"], path=path, ns=ns)
    if match["tags"]:
        return RegistryRequest("tags", route, name, query=_tags_query(query), path=path, ns=ns)
    _check_digest(match["subject"])
    return RegistryRequest(
        "referrers", route, name, match["subject"], query=_referrers_query(query), path=path, ns=ns
    )


def _route_of(
    name: str, ns: str, named_by_path: Route | None, routes: tuple[Route, ...]
) -> tuple[Route, str]:
    if named_by_path is not None:
        if ns and ns not in named_by_path.registry_hosts:
            raise name_unknown(f"this route does not mirror {ns}")
        return named_by_path, name
    if ns:
        for route in routes:
            if ns in route.registry_hosts:
                return route, name
        raise name_unknown(f"registry {ns} is not mirrored here")
    for route in sorted(routes, key=lambda r: len(r.prefix), reverse=True):
        prefix = route.prefix[1:]  # "/dockerhub/" names "dockerhub/<name>"
        if name.startswith(prefix) and len(name) > len(prefix):
            return route, name[len(prefix) :]
    for route in routes:
        if route.registry_default:
            return route, name
    raise name_unknown("no registry mirrored here serves this name (give ns= or a route name)")


def _check_digest(reference: str) -> None:
    if _SHA256.fullmatch(reference):
        return
    if _OTHER_DIGEST.fullmatch(reference):
        raise digest_invalid("only sha256 digests are supported")
    raise digest_invalid("invalid digest")


def _params(query: bytes) -> list[tuple[str, str]]:
    if len(query) > 2048 or not _QUERY_BYTES.fullmatch(query):
        raise name_invalid("query has characters that are not allowed")
    out = []
    for part in query.decode("ascii").split("&"):
        if part:
            key, _, value = part.partition("=")
            out.append((key, unquote(value)))
    return out


def _one(query: bytes, key: str) -> str | None:
    values = [value for name, value in _params(query) if name == key]
    if len(values) > 1:
        raise name_invalid(f"query parameter {key} given twice")
    return values[0] if values else None


def _ns(query: bytes) -> str:
    ns = _one(query, "ns")
    if ns is None:
        return ""
    ns = ns.lower()
    if len(ns) > 255 or not _HOST.fullmatch(ns):
        raise name_invalid("ns is not a registry host name")
    return ns


def _tags_query(query: bytes) -> str:
    out = []
    n = _one(query, "n")
    if n is not None:
        if not n.isdigit() or len(n) > 5:
            raise RegistryError(400, "PAGINATION_NUMBER_INVALID", "n must be a number")
        out.append(f"n={int(n)}")
    last = _one(query, "last")
    if last is not None:
        if not _TAG.fullmatch(last):
            raise RegistryError(400, "TAG_INVALID", "last is not a tag")
        out.append(f"last={last}")
    return "&".join(out)


def _referrers_query(query: bytes) -> str:
    kind = _one(query, "artifactType")
    if kind is None:
        return ""
    if not _MEDIA_TYPE.fullmatch(kind):
        raise name_invalid("artifactType is not a media type")
    return "artifactType=" + kind.replace("/", "%2F").replace("+", "%2B")


def tags_query_of_link(target: str) -> str | None:
    """The checked `n`/`last` of a tags list's next-page link target (`/v2/...?n=&last=`),
    None when it has none or they are not valid."""
    _, sep, query = target.partition("?")
    if not sep:
        return None
    try:
        return _tags_query(query.encode("ascii")) or None
    except (RegistryError, UnicodeError):
        return None
