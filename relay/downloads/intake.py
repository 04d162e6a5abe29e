"""Reading a POST /downloads body into an `Order`, refusing anything doubtful.

`{"path": "/gh/org/repo/file.tar.gz"}` names a path under a configured route;
`{"url": "https://github.com/org/repo/file.tar.gz"}` is accepted only when it starts with a
route's upstream base, and is mapped back onto that route's path, so both spellings go
through the same traversal checks (`RouteTable.resolve`) as a relayed request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from relay.downloads.names import check_name, name_from_path
from relay.errors import InvalidField, NoRoute, NotFound, RelayError
from relay.net.routing import RouteTable

FIELDS = frozenset({"path", "url", "sha256", "size", "name"})
MAX_PATH = 8192
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_ABSOLUTE_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/?#]*)(.*)", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Order:
    path: str
    """The route path, with its query if any."""
    url: str
    name: str
    sha256: str | None = None
    size: int | None = None


def parse_order(data: object, table: RouteTable) -> Order:
    if not isinstance(data, dict):
        raise InvalidField("body", "expected a JSON object")
    unknown = sorted(set(data) - FIELDS)
    if unknown:
        raise InvalidField(str(unknown[0])[:50], "unknown field")
    if ("path" in data) == ("url" in data):
        raise InvalidField("path", "give exactly one of path or url")
    field = "path" if "path" in data else "url"
    value = data[field]
    if not isinstance(value, str):
        raise InvalidField(field, "expected a string")
    if len(value) > MAX_PATH:
        raise InvalidField(field, f"longer than {MAX_PATH} characters", status_code=400)
    path = value if field == "path" else path_for_url(value, table)
    url = _resolve(path, table, field)
    return Order(
        path=path,
        url=url,
        name=check_name(data["name"]) if "name" in data else name_from_path(path),
        sha256=_sha256(data.get("sha256")),
        size=_size(data.get("size")),
    )


def path_for_url(url: str, table: RouteTable) -> str:
    """The route path that relays `url`: the longest matching upstream base wins."""
    m = _ABSOLUTE_URL.fullmatch(url)
    if m is None:
        raise InvalidField("url", "expected an absolute http(s) URL", status_code=400)
    # Scheme and host are case-insensitive; route upstreams are stored lower-cased.
    normalised = m.group(1).lower() + m.group(2)
    for upstream, route in table.by_upstream():
        if normalised.startswith(upstream):
            return route.prefix + normalised[len(upstream) :]
    raise NotFound("no configured route serves this URL", field="url")


def _resolve(path: str, table: RouteTable, field: str) -> str:
    raw_path, _, query = path.partition("?")
    try:
        return table.resolve(raw_path.encode("ascii"), query.encode("ascii")).url
    except UnicodeEncodeError:
        raise InvalidField(
            field, "must be ASCII (percent-encode the rest)", status_code=400
        ) from None
    except NoRoute as exc:
        raise NotFound(exc.reason, field=field) from None
    except RelayError as exc:
        raise InvalidField(field, exc.reason, status_code=exc.status_code) from None


def _sha256(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise InvalidField("sha256", "expected 64 hexadecimal characters")
    return value.lower()


def _size(value: object) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidField("size", "expected a non-negative integer")
    return value
