"""A request whose credential its caller renews, per mirror: a registry's tokens.

A credential that belongs to one upstream origin and expires (a registry's bearer token: per
registry, per repository scope, minutes long) cannot be fixed in the request once and for all:
each mirror of a route has its own, a long body outlives it, and a resume or a slice may need a
new one. Whoever builds such a request marks it with an `Authorizer` (`mark_authorized`);
`relay.net.upstream.Upstream.open` then, for every mirror it asks:

- sends that mirror's own kept credential (`Authorizer.known`) in place of the one the request
  carried for another mirror: a credential never reaches another origin;
- answers a 401 from that mirror itself (not from a redirect's host, such as object storage)
  with one retry carrying a renewed credential (`Authorizer.renew`); never more than one retry
  per request sent, and a failure to renew is that mirror's failure.

A request that continues another (a resume, a continuation of a cut body) is authorized as the
one it continues was (`relay.http.resume.mark_continuation` carries the mark over).
"""

from __future__ import annotations

from typing import Protocol

import httpx

#: Request extension: the request's `Authorizer`.
AUTHORIZER = "relay.authorizer"
#: The header an `Authorizer`'s values go in.
HEADER = "authorization"


class Authorizer(Protocol):
    def known(self, mirror: int) -> str | None:
        """The credential kept for the route's mirror `mirror` (no I/O), None for none."""

    async def renew(self, mirror: int, refused: httpx.Response) -> str:
        """A new credential for `mirror`, which answered `refused` (a 401, read for its
        challenge). Raises relay.errors.UpstreamError when there is none to be had."""


def mark_authorized(request: httpx.Request, authorizer: Authorizer) -> httpx.Request:
    request.extensions[AUTHORIZER] = authorizer
    return request


def authorized_as(request: httpx.Request, source: httpx.Request) -> httpx.Request:
    """`request`, made from `source` (a retry, a continuation, its copy for another mirror,
    its unconditional form), marked to be authorized as `source` is."""
    if AUTHORIZER in source.extensions:
        request.extensions[AUTHORIZER] = source.extensions[AUTHORIZER]
    return request


def authorizer_of(request: httpx.Request) -> Authorizer | None:
    authorizer: Authorizer | None = request.extensions.get(AUTHORIZER)
    return authorizer


def with_credential(headers: list[tuple[str, str]], value: str | None) -> list[tuple[str, str]]:
    """`headers` with `value` as the only Authorization (none for None)."""
    kept = [(n, v) for n, v in headers if n.lower() != HEADER]
    return kept if value is None else [*kept, (HEADER, value)]


__all__ = [
    "AUTHORIZER",
    "Authorizer",
    "authorized_as",
    "authorizer_of",
    "mark_authorized",
    "with_credential",
]
