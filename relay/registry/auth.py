"""The upstream side of registry auth: relay does the token dance itself, per registry.

A registry that wants a token answers 401 with `WWW-Authenticate: Bearer realm=...,
service=..., scope=...`. relay then asks the realm for a token (`GET realm?service=&scope=`,
anonymous, or with the registry's `username_env`/`password_env` as Basic), keeps it per
(route, mirror, scope) until shortly before its `expires_in` (60 s when not given, as the spec
says), and retries the request once with it (`Upstream.open`, by the request's `Authorizer`:
`relay.http.authorize`). A registry that asks for Basic gets its configured credentials, or
relay answers 502 naming the cause.

Each of a route's mirrors (`upstreams`: a registry and its copies) is its own registry here:
its own challenge, realm, credentials and tokens; a token is only ever sent to the registry
whose realm issued it.

A registry's challenge is learned from any 401 (or, before a request whose answer is shared by
many clients and must carry its token from the start, a blob's cache fill, by asking
`GET /v2/` once: no rate limit counts it), so later requests carry a token from the first try.

Safety:
- the realm is accepted only on that registry's own host or the route's `redirect_hosts`, over
  https (http only with `allow_private`, for loopback tests), without user information: a
  registry cannot make relay send its credentials (or its traffic) anywhere else;
- a client's own `Authorization` never reaches an upstream: tokens are relay's, per registry;
- the token map is keyed by client input (the repository in the scope): bounded, least
  recently used first (`MAX_TOKENS`); concurrent requests for one scope share one fetch.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from relay.cache.bounded import Lru
from relay.cache.clock import Clock
from relay.config import Route
from relay.errors import UpstreamError, UpstreamRefused, UpstreamUnavailable
from relay.http.authorize import Authorizer
from relay.net.redirects import host_allowed
from relay.net.upstream import MIRROR_INDEX, USER_AGENT, VIA, Upstream

logger = logging.getLogger(__name__)

#: Tokens kept (per route, mirror and scope); the least recently stored go first.
MAX_TOKENS = 4096
#: Largest token answer read from a realm.
MAX_TOKEN_ANSWER = 64 * 1024
#: Seconds a token is kept when its answer gives no `expires_in` (the distribution spec's).
DEFAULT_EXPIRES_IN = 60
#: A token is not used in the last seconds of its life: it must not expire on the way.
EXPIRY_MARGIN = 5.0
_PARAM = re.compile(r'([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')
_MAX_SCOPE = 512
#: How relay names itself on its own requests (as on every upstream request).
_IDENTITY = (("user-agent", USER_AGENT), ("via", VIA.decode("latin-1")))


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str
    """"bearer" or "basic"."""
    realm: str = ""
    service: str = ""
    scope: str = ""


def parse_challenge(value: str | None) -> Challenge | None:
    """The first Bearer or Basic challenge of a `WWW-Authenticate` value, None for others."""
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "basic":
        return Challenge("basic")
    if scheme != "bearer":
        return None
    params = {
        m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
        for m in _PARAM.finditer(rest)
    }
    realm = params.get("realm") or ""
    if not realm:
        return None
    scope = params.get("scope") or ""
    return Challenge(
        "bearer", realm, params.get("service") or "", scope if len(scope) <= _MAX_SCOPE else ""
    )


class _Abandoned(Exception):
    """The request that fetched a token went away before it had one: ask again."""


_UNKNOWN = Challenge("unknown")


class RegistryAuth:
    """Authorization values for upstream registry requests, per route and mirror (see the
    module)."""

    def __init__(self, upstream: Upstream, clock: Clock) -> None:
        self._upstream = upstream
        self._clock = clock
        # Per (route, mirror); None: anonymous works. Bounded by the configuration.
        self._challenges: dict[tuple[str, int], Challenge | None] = {}
        self._tokens: Lru[tuple[str, int, str], tuple[str, float]] = Lru(MAX_TOKENS)
        self._fetching: dict[tuple[str, int, str], asyncio.Future[str]] = {}
        self._probes: dict[str, asyncio.Future[Challenge | None]] = {}
        self.token_fetches: dict[tuple[str, str], int] = {}
        """(route prefix, "ok" | "failed") -> token requests made to realms."""
        self.on_fetch: Callable[[str, str], None] | None = None

    # ---- before a request --------------------------------------------------------------

    def authorizer(self, route: Route, scope: str) -> Authorizer:
        """What renews a request's token, for whichever of the route's mirrors it goes to."""
        return _ScopeAuthorizer(self, route, scope)

    async def authorization(self, route: Route, scope: str, *, probe: bool = False) -> str | None:
        """The Authorization value for a request of `scope` on `route`'s first mirror: a
        token (kept or fetched now) when it is known to want one, its Basic credentials when
        it asks for those, None while it is anonymous or not known yet (with `probe`: ask
        `/v2/` first). Raises UpstreamError."""
        challenge = self._challenges.get((route.prefix, 0), _UNKNOWN)
        if challenge is _UNKNOWN:
            if not probe:
                return None
            challenge = await self._probe(route)
        if challenge is None or challenge is _UNKNOWN:
            return None
        if challenge.scheme == "basic":
            return _basic(route, 0)
        return await self._token(route, challenge, scope, 0)

    def known(self, route: Route, scope: str, mirror: int = 0) -> str | None:
        """A kept, unexpired Authorization for `scope` at `mirror` (no I/O): an anonymous
        registry's None."""
        kept = self._tokens.get((route.prefix, mirror, scope))
        if kept is not None and kept[1] > self._clock.monotonic():
            return kept[0]
        challenge = self._challenges.get((route.prefix, mirror))
        if challenge is not None and challenge.scheme == "basic" and route.mirror_login(mirror):
            return _basic(route, mirror)
        return None

    # ---- after a 401 ---------------------------------------------------------------------

    async def after_401(
        self, route: Route, response: httpx.Response, scope: str, mirror: int = 0
    ) -> str:
        """The Authorization to retry with once `mirror` answered `response` (a 401): its
        challenge learned, a new token fetched. Raises UpstreamError saying why not."""
        challenge = parse_challenge(response.headers.get("www-authenticate"))
        if challenge is None:
            raise UpstreamUnavailable("upstream answered 401 without a Bearer or Basic challenge")
        self._challenges[(route.prefix, mirror)] = Challenge(
            challenge.scheme, challenge.realm, challenge.service
        )
        if challenge.scheme == "basic":
            return _basic(route, mirror)
        self._tokens.pop((route.prefix, mirror, scope), None)
        return await self._token(route, challenge, scope, mirror, fresh=True)

    # ---- tokens --------------------------------------------------------------------------

    async def _token(
        self, route: Route, challenge: Challenge, scope: str, mirror: int, *, fresh: bool = False
    ) -> str:
        key = (route.prefix, mirror, scope)
        while True:
            if not fresh:
                kept = self.known(route, scope, mirror)
                if kept is not None:
                    return kept
            fetching = self._fetching.get(key)
            if fetching is None:
                break
            try:
                return await asyncio.shield(fetching)
            except _Abandoned:
                continue
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._fetching[key] = future
        try:
            value, expires_in = await self._fetch(
                route, challenge, challenge.scope or scope, mirror
            )
        except asyncio.CancelledError:
            future.set_exception(_Abandoned())
            raise
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self._fetching[key]
        until = self._clock.monotonic() + max(0.0, expires_in - EXPIRY_MARGIN)
        self._tokens[key] = (value, until)
        future.set_result(value)
        return value

    async def _fetch(
        self, route: Route, challenge: Challenge, scope: str, mirror: int
    ) -> tuple[str, float]:
        url = realm_url(route, challenge.realm, mirror)
        params = {k: v for k, v in (("service", challenge.service), ("scope", scope)) if v}
        headers = [("accept", "application/json"), *_IDENTITY]
        if route.mirror_login(mirror) is not None:
            headers.append(("authorization", _basic(route, mirror)))
        upstream = self._upstream
        request = upstream.build_request("GET", url.copy_merge_params(params), headers, route)
        outcome = "failed"
        try:
            response = await upstream.open(request, route, follow=False, alone=True)
            try:
                status = response.status_code
                if status != 200:
                    # A 4xx refuses this scope (the client's name), not the registry's health.
                    refused = 400 <= status < 500 and status != 429
                    error = UpstreamRefused if refused else UpstreamUnavailable
                    raise error(f"the registry's token realm answered {status}")
                body = await _bounded(response)
            finally:
                await asyncio.shield(response.aclose())
            token, expires_in = _token_of(body)
            outcome = "ok"
            return f"Bearer {token}", expires_in
        finally:
            counter = (route.prefix, outcome)
            self.token_fetches[counter] = self.token_fetches.get(counter, 0) + 1

    async def _probe(self, route: Route) -> Challenge | None:
        """Ask `GET /v2/` whether the route's registry wants a token (once per route at a
        time): the first mirror's challenge, or what the mirror that answered instead wants
        (learned for that mirror; None returned: the first mirror is still unknown)."""
        probing = self._probes.get(route.prefix)
        if probing is not None:
            return await asyncio.shield(probing)
        future: asyncio.Future[Challenge | None] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieved)
        self._probes[route.prefix] = future
        try:
            upstream = self._upstream
            headers = [("accept-encoding", "identity"), *_IDENTITY]
            request = upstream.build_request("GET", route.upstream + "v2/", headers, route)
            response = await upstream.open(request, route, follow=False)
            try:
                challenge = (
                    parse_challenge(response.headers.get("www-authenticate"))
                    if response.status_code == 401
                    else None
                )
            finally:
                await asyncio.shield(response.aclose())
            mirror = response.extensions.get(MIRROR_INDEX, 0)
            if response.status_code == 200 or challenge is not None:
                self._challenges[(route.prefix, mirror)] = challenge
            if mirror != 0:
                challenge = None  # another mirror answered: the first one is still unknown
            future.set_result(challenge)
            return challenge
        except asyncio.CancelledError:
            future.set_result(None)
            raise
        except BaseException as exc:
            future.set_exception(exc)
            raise
        finally:
            del self._probes[route.prefix]


def realm_url(route: Route, realm: str, mirror: int = 0) -> httpx.URL:
    """The realm as a URL relay may ask for `mirror`'s tokens; UpstreamUnavailable when the
    route does not allow it (another host than that registry's or `redirect_hosts`, not
    https, user information)."""
    try:
        url = httpx.URL(realm)
    except (httpx.InvalidURL, ValueError, UnicodeError):
        raise UpstreamUnavailable("the registry's token realm is not a URL") from None
    registry = httpx.URL(route.upstreams[mirror].url)
    if url.scheme != "https" and not (url.scheme == "http" and route.allow_private):
        raise UpstreamUnavailable("the registry's token realm is not https")
    if url.userinfo:
        raise UpstreamUnavailable("the registry's token realm has user information")
    host = url.host.lower()
    if host != registry.host.lower() and not host_allowed(host, route.redirect_hosts):
        raise UpstreamUnavailable(
            f"the registry's token realm {host} is not the registry's host or in redirect_hosts"
        )
    return url


class _ScopeAuthorizer:
    """The `Authorizer` of one route's requests of one scope (`relay.http.authorize`)."""

    def __init__(self, auth: RegistryAuth, route: Route, scope: str) -> None:
        self._auth, self._route, self._scope = auth, route, scope

    def known(self, mirror: int) -> str | None:
        return self._auth.known(self._route, self._scope, mirror)

    async def renew(self, mirror: int, refused: httpx.Response) -> str:
        return await self._auth.after_401(self._route, refused, self._scope, mirror)


def _basic(route: Route, mirror: int) -> str:
    login = route.mirror_login(mirror)
    if login is None:
        raise UpstreamUnavailable(
            "the registry asks for Basic credentials: set username_env and password_env"
        )
    user, password = login
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


async def _bounded(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > MAX_TOKEN_ANSWER:
                raise UpstreamUnavailable("the registry's token answer is too large")
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable("the registry's token answer failed") from exc
    return bytes(body)


def _token_of(body: bytes) -> tuple[str, float]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the stack
        raise UpstreamUnavailable("the registry's token answer is not JSON") from None
    if not isinstance(data, dict):
        raise UpstreamUnavailable("the registry's token answer is not a JSON object")
    token = data.get("token") or data.get("access_token")
    if not isinstance(token, str) or not token or not token.isascii() or not token.isprintable():
        raise UpstreamUnavailable("the registry's token answer has no usable token")
    expires_in = data.get("expires_in", DEFAULT_EXPIRES_IN)
    if not isinstance(expires_in, int | float) or isinstance(expires_in, bool) or expires_in <= 0:
        expires_in = DEFAULT_EXPIRES_IN
    return token, float(expires_in)


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a shared future's exception as seen (its waiters may all have gone)."""
    if not future.cancelled():
        future.exception()


__all__ = ["Challenge", "RegistryAuth", "UpstreamError", "parse_challenge", "realm_url"]
