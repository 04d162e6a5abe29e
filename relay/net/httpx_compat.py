"""The private parts of httpx that relay uses, in one place, checked when relay is imported.

- `AsyncClient._transport_for_url`: the transport a request goes to (mounts included). relay's
  client hands streamed requests straight to it (relay/net/client.py); httpx has no public
  accessor.
- `URL._uri_reference`: the parsed form of a URL. relay puts a route's path and query in place
  of its base's without parsing the whole URL again (relay/net/upstream.py); httpx's public
  `copy_with` parses again, which was the largest single cost of a small request.
"""

from __future__ import annotations

import httpx

from relay.net.compat import IncompatibleDependency, has_method


class HttpxIncompatible(IncompatibleDependency):
    owner = "httpx's "
    installed = f"httpx {httpx.__version__}"


_require = HttpxIncompatible.require


def check() -> None:
    """Every private part below is where relay expects it (run at import)."""
    _require(has_method(httpx.AsyncClient, "_transport_for_url"), "AsyncClient._transport_for_url")
    try:
        url = with_path_and_query(httpx.URL("http://h.test/base"), "/a%2Fb", "q=1")
    except (AttributeError, TypeError) as exc:
        raise HttpxIncompatible.missing(f"URL._uri_reference ({exc})") from exc
    _require(str(url) == "http://h.test/base/a%2Fb?q=1", "URL._uri_reference (as a namedtuple)")


def transport_for(client: httpx.AsyncClient, url: httpx.URL) -> httpx.AsyncBaseTransport:
    """The transport `client` sends a request for `url` to."""
    return client._transport_for_url(url)


def with_path_and_query(base: httpx.URL, path_suffix: str, query: str | None) -> httpx.URL:
    """`base` with `path_suffix` appended to its path and `query` as its query, both already
    in their encoded form (checked by relay's routing), without parsing the URL again."""
    parsed = base._uri_reference
    url = httpx.URL.__new__(httpx.URL)
    url._uri_reference = parsed._replace(path=parsed.path + path_suffix, query=query)
    return url


check()
