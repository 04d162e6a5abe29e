"""Requests to an upstream registry: relay's own headers, its tokens (each request marked with
its `Authorizer`: one retry after a 401, each mirror's own token), and the registry's non-200
answers turned into relay's.

What goes upstream is built from the request's key, never from the client's headers: relay's
identity, `Accept-Encoding: identity` (bytes are relayed and hashed as the registry stores
them), a manifest's Accept (part of a tag's key), and for a relayed blob the client's `Range`
/ `If-Range` only. A client's `Authorization` never goes upstream: the tokens are relay's
(`relay.registry.auth`). Redirects (blobs in object storage) are followed to the route's
`redirect_hosts` only, the registry's token never sent to another origin (`Upstream.open`).
"""

from __future__ import annotations

import asyncio
import json

import httpx

from relay.config import Route
from relay.errors import UpstreamError, UpstreamRefused, UpstreamUnavailable
from relay.http.authorize import mark_authorized
from relay.net.mirrors import error_counts
from relay.net.upstream import USER_AGENT, VIA, Upstream
from relay.registry.auth import RegistryAuth
from relay.registry.errors import RegistryError
from relay.registry.names import RegistryRequest

#: Largest upstream error body read for its registry error code.
MAX_ERROR_BODY = 16 * 1024
#: The codes of an upstream's 404 that are passed on as they are.
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "BLOB_UNKNOWN", "NAME_UNKNOWN"})
_NOT_FOUND_CODE = {
    "manifest": "MANIFEST_UNKNOWN",
    "blob": "BLOB_UNKNOWN",
    "tags": "NAME_UNKNOWN",
    "referrers": "MANIFEST_UNKNOWN",
}


class RegistryUpstream:
    """Opens upstream registry responses for parsed requests (see the module)."""

    def __init__(self, upstream: Upstream, auth: RegistryAuth) -> None:
        self.upstream = upstream
        self.auth = auth

    def url(self, request: RegistryRequest, path: str | None = None) -> httpx.URL:
        assert request.route is not None
        url = request.route.upstream + (path or request.upstream_path)
        return httpx.URL(f"{url}?{request.query}" if request.query else url)

    @staticmethod
    def headers(
        *, accept: str = "", extra: list[tuple[str, str]] | None = None
    ) -> list[tuple[str, str]]:
        out = [
            ("accept-encoding", "identity"),
            ("user-agent", USER_AGENT),
            ("via", VIA.decode("latin-1")),
        ]
        if accept:
            out.append(("accept", accept))
        return out + (extra or [])

    async def authorization(self, route: Route, scope: str, *, probe: bool = False) -> str | None:
        """The first registry's Authorization for a request (`RegistryAuth.authorization`).
        With several registries, a failure to get the first one's token (its realm down) is
        that registry's failure (it rests as any failing mirror does), and the request goes
        out without a token: the route's failover takes it on (not a 502 before the next
        registry is asked), past the first while it rests (one wait for a hanging realm).
        While the first registry is passed over (resting), nothing is asked for it: no probe,
        no token (the next registry's token is put on the request as it moves there)."""
        if self.upstream.mirrors.of(route).skipped(0):
            return None
        try:
            return await self.auth.authorization(route, scope, probe=probe)
        except UpstreamError as exc:
            if len(route.upstreams) < 2 or isinstance(exc, UpstreamRefused):
                raise  # a refusal of this scope is an answer, not the registry's outage
            if error_counts(exc):
                self.upstream.mirrors.of(route).failed(0, f"token realm: {exc.reason}")
            return None

    def build(
        self,
        method: str,
        request: RegistryRequest,
        headers: list[tuple[str, str]],
        authorization: str | None,
        *,
        path: str | None = None,
    ) -> httpx.Request:
        route = request.route
        assert route is not None
        if authorization:
            headers = [*headers, ("authorization", authorization)]
        built = self.upstream.build_request(method, self.url(request, path), headers, route)
        return mark_authorized(built, self.auth.authorizer(route, request.scope))

    async def open(
        self,
        method: str,
        request: RegistryRequest,
        headers: list[tuple[str, str]],
        *,
        path: str | None = None,
    ) -> httpx.Response:
        """The upstream's answer (headers read; the caller closes it), with the token dance
        done: a 401 from a registry is answered once with a new token of its own
        (`Upstream.open`). Raises UpstreamError."""
        route = request.route
        assert route is not None
        authorization = await self.authorization(route, request.scope)
        built = self.build(method, request, headers, authorization, path=path)
        return await self.upstream.open(built, route)


async def refusal(response: httpx.Response, request: RegistryRequest) -> RegistryError:
    """What relay answers for an upstream answer that is not a 200 (or a 206): read (a
    little of its body, for a 404's code) and closed here."""
    try:
        status = response.status_code
        if status == 404:
            code = await _error_code(response) if response.request.method != "HEAD" else None
            if code not in _NOT_FOUND_CODES:
                code = _NOT_FOUND_CODE.get(request.kind, "NAME_UNKNOWN")
            return RegistryError(404, code, "not found upstream")
        if status == 401:
            # Still refused with relay's token: the repository does not exist, or relay's
            # credentials do not reach it. Never the upstream's challenge.
            return RegistryError(
                404, "NAME_UNKNOWN", "repository not found, or not authorized upstream"
            )
        if status == 403:
            return RegistryError(403, "DENIED", "the upstream registry denied access")
        if status == 429:
            retry = response.headers.get("retry-after", "")
            headers = {"Retry-After": retry} if retry.isdigit() and len(retry) < 8 else {}
            return RegistryError(
                429, "TOOMANYREQUESTS", "the upstream registry is rate limiting", headers
            )
        if status == 416:
            return RegistryError(416, "BLOB_UNKNOWN", "range not satisfiable")
        return RegistryError(502, "UNAVAILABLE", f"the upstream registry answered {status}")
    finally:
        await asyncio.shield(response.aclose())


def upstream_failure(exc: UpstreamError) -> RegistryError:
    return RegistryError(exc.status_code, "UNAVAILABLE", exc.reason, exc.headers)


async def _error_code(response: httpx.Response) -> str | None:
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_ERROR_BODY:
                return None
        errors = json.loads(body).get("errors")
        code = errors[0].get("code") if isinstance(errors, list) and errors else None
    except (httpx.HTTPError, ValueError, AttributeError, TypeError, RecursionError):
        return None
    return code if isinstance(code, str) else None


def route_of(request: RegistryRequest) -> Route:
    assert request.route is not None
    return request.route


__all__ = ["RegistryUpstream", "UpstreamUnavailable", "refusal", "route_of", "upstream_failure"]
