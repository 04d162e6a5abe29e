"""Talking to upstreams: building the request, opening the stream, translating failures,
and a route's mirrors (`relay.net.mirrors`): the next one asked before the first byte, a
body continued from another one only when its identity is pinned by a digest."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Iterator

import httpx

from relay import __version__
from relay.config import Config, Route
from relay.errors import PoolExhausted, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from relay.http.authorize import authorized_as, authorizer_of, with_credential
from relay.http.continuation import CONTINUATION, SWITCHED_FROM
from relay.net.httpx_compat import with_path_and_query
from relay.net.mirrors import (
    Attempt,
    MirrorBoard,
    RouteMirrors,
    error_counts,
    error_falls_through,
    failed_status,
    falls_through,
)
from relay.net.redirects import REDIRECT_STATUSES, next_hop, same_origin
from relay.net.routing import Target
from relay.net.transports import ALLOW_PRIVATE, PoolStats

logger = logging.getLogger(__name__)

# How relay names itself to upstreams (and in Via to clients), whichever program asks.
VIA = b"1.1 relay"
USER_AGENT = f"relay/{__version__}"

_NO_BODY = httpx.ByteStream(b"")

# What httpx leaves unescaped in a query: RFC 3986 query characters and valid escapes.
_PLAIN_QUERY = re.compile(r"(?:[A-Za-z0-9\-._~!$&'()*+,;=:/?@\[\]]|%[0-9A-Fa-f]{2})*")


@contextlib.contextmanager
def map_upstream_errors() -> Iterator[None]:
    """The one place where httpx errors become the statuses relay answers with.

    The reason (the client's body) names the kind of failure only; the library's message,
    which may name addresses and ports, stays on the exception's cause for the log.
    """
    try:
        yield
    except httpx.PoolTimeout as exc:
        raise PoolExhausted("no upstream connection free; retry shortly") from exc
    except httpx.TimeoutException as exc:
        phase = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for"
        raise UpstreamTimeout(f"timed out {phase} the upstream") from exc
    except httpx.ConnectError as exc:
        # The transport says "refused by egress policy: <host> resolves to <address> ...".
        if _EGRESS_REFUSED in str(exc):
            raise UpstreamUnavailable(f"cannot connect to the upstream: {_EGRESS_REFUSED}") from exc
        raise UpstreamUnavailable("cannot connect to the upstream") from exc
    except httpx.RemoteProtocolError as exc:
        raise UpstreamUnavailable("upstream sent an invalid or incomplete response") from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable("upstream connection failed") from exc


_EGRESS_REFUSED = "refused by egress policy"


def cause_of(exc: BaseException) -> str:
    """The detail behind a relay error, for the log only (it may name addresses)."""
    cause = exc.__cause__
    if cause is None:
        return ""
    text = str(cause).strip()
    return text.splitlines()[0][:200] if text else type(cause).__name__


class Upstream:
    """Opens upstream responses as streams on the one shared client.

    Background work (a cache fill no client waits for) yields the pool to clients: its
    requests never wait for a connection (they fail at once with PoolExhausted when none is
    free), and a client's request that finds every connection in use first asks `make_room`
    (set by the cache) to stop one such fill, whose connection it then gets.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        config: Config,
        *,
        pool: Callable[[], PoolStats] | None = None,
        mirrors: MirrorBoard | None = None,
    ) -> None:
        self._client = client
        self.mirrors = mirrors if mirrors is not None else MirrorBoard(config.routes, _monotonic)
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.pool_timeout,
        ).as_dict()
        self._background_timeout = {**self._timeout, "pool": 0.0}
        self._bases: dict[str, httpx.URL] = {}
        self._pool = pool
        self._max_connections = config.max_connections
        self.make_room: Callable[[], bool] | None = None
        """Stops one piece of background work holding an upstream connection, so that it
        goes to a client's request; False when there is none (the cache sets it)."""

    def build_request(
        self,
        method: str,
        url: str | httpx.URL,
        headers: list[tuple[str, str]],
        route: Route,
    ) -> httpx.Request:
        # Built directly, not with client.build_request, so that httpx's default headers
        # (Accept-Encoding: gzip, its User-Agent) are never merged in. With `stream=` httpx
        # adds no header either (it would otherwise rebuild the headers to add Host), so
        # Host is set here, first, as httpx would.
        extensions: dict[str, object] = {"timeout": self._timeout}
        if route.allow_private:
            extensions[ALLOW_PRIVATE] = True
        if not isinstance(url, httpx.URL):
            url = httpx.URL(url)
        if not any(name.lower() == "host" for name, _ in headers):
            headers = [("Host", url.netloc.decode("ascii")), *headers]
        return httpx.Request(method, url, headers=headers, extensions=extensions, stream=_NO_BODY)

    def url_for(self, target: Target) -> httpx.URL:
        """The target's upstream URL as an httpx.URL, without parsing it again.

        The route's base is parsed once; the path and query routing checked are put in
        place of its own. A query with characters httpx would escape is parsed as usual.
        httpx parsing the whole URL was the largest single cost of a small request.
        """
        base = self._bases.get(target.route.upstream)
        if base is None:
            base = self._bases[target.route.upstream] = httpx.URL(target.route.upstream)
        if target.query is not None and not _PLAIN_QUERY.fullmatch(target.query):
            return httpx.URL(target.url)
        return with_path_and_query(base, target.rest, target.query)

    async def open(
        self,
        request: httpx.Request,
        route: Route,
        *,
        follow: bool = True,
        background: bool = False,
        alone: bool = False,
    ) -> httpx.Response:
        """Send the request and return once headers arrived; the caller must close the body.

        With `redirects = "follow"` the route's redirects are followed here, to allowed hosts
        only; the response returned is the first one that is not such a redirect. With
        `follow=False` the first answer is returned whatever it is (the caller may go on with
        `redirected`). `background`: no client waits for this request (see the class).

        On a route with several mirrors, a request below one of them goes on to the next as
        the route's `failover` allows (`relay.net.mirrors`), each mirror with its own
        credential. A request continuing a body (marked `CONTINUATION` by its caller) stays
        on its mirror, unless the body's identity is pinned by a digest (the mark's value)
        and the route's failover is "any": then the next mirrors are asked first, without
        If-Range (validators are not comparable across mirrors), and an answer from another
        mirror is marked `SWITCHED_FROM` (the caller verifies the digest before the body ends).
        `alone`: this URL only, never another mirror (a registry's token realm, its probe).

        A request marked with an `Authorizer` (`relay.http.authorize`) carries each mirror's
        own credential, and a 401 from the mirror is answered by one retry with a new one.
        """
        mirrors = self.mirrors.of(route)
        current = mirrors.index_of(str(request.url)) if mirrors.several else None
        if current is None or alone:
            return await self._open_authorized(
                request, route, current or 0, follow=follow, background=background
            )
        continuation = request.extensions.get(CONTINUATION)
        if continuation is None:
            attempts = mirrors.order(current)
        elif continuation and mirrors.policy == "any":
            attempts = mirrors.order(current + 1)
        else:
            attempts = [Attempt(current, route.upstreams[current].url)]
        return await _MirrorOpen(self, request, route, mirrors, current).run(
            attempts, follow=follow, background=background
        )

    def for_mirror(
        self, request: httpx.Request, route: Route, current: int, index: int
    ) -> httpx.Request:
        """`request` (made for mirror `current`) made for mirror `index`: the same path below
        its base, its own credential in place of the other's, the client's credentials only
        to the same origin; a continuation without If-Range."""
        url = str(request.url)
        base = route.upstreams[current].url
        assert url.startswith(base)
        target = httpx.URL(route.upstreams[index].url + url[len(base) :])
        dropped = {"host"}
        if CONTINUATION in request.extensions:
            dropped.add("if-range")
        if route.mirror_credential(current):
            dropped.add(route.auth_header.lower())
        if not same_origin(target, request.url):
            dropped |= _CREDENTIAL_HEADERS
        headers = [(n, v) for n, v in request.headers.multi_items() if n not in dropped]
        credential = route.mirror_credential(index)
        if credential:
            headers.append((route.auth_header, credential))
        authorizer = authorizer_of(request)
        if authorizer is not None:  # that mirror's own token, never the other's
            headers = with_credential(headers, authorizer.known(index))
        return _derived(self.build_request(request.method, target, headers, route), request)

    async def _open_authorized(
        self,
        request: httpx.Request,
        route: Route,
        index: int,
        *,
        follow: bool,
        background: bool,
    ) -> httpx.Response:
        """`_open_one`; for a request with an `Authorizer` answered 401 by its mirror (not by
        a redirect's host), one retry with the credential renewed for that mirror."""
        response = await self._open_one(request, route, follow=follow, background=background)
        authorizer = authorizer_of(request)
        if (
            authorizer is None
            or response.status_code != 401
            or response.request.url.netloc != request.url.netloc
            or not str(request.url).startswith(route.upstreams[index].url)
        ):
            return response  # a credential is renewed for (and sent to) its own mirror only
        try:
            value = await authorizer.renew(index, response)
        finally:
            await asyncio.shield(response.aclose())
        headers = with_credential(request.headers.multi_items(), value)
        retry = self.build_request(
            request.method, request.url, [(n, v) for n, v in headers if n != "host"], route
        )
        _derived(retry, request)
        logger.info("upstream answered 401: asked again once with a new credential")
        return await self._open_one(retry, route, follow=follow, background=background)

    async def _open_one(
        self,
        request: httpx.Request,
        route: Route,
        *,
        follow: bool = True,
        background: bool = False,
    ) -> httpx.Response:
        hops: list[httpx.Headers] = []
        try:
            for _ in range(route.max_redirects + 1):
                if background:
                    request.extensions["timeout"] = self._background_timeout
                elif self.make_room is not None and self._pool_full():
                    self.make_room()
                with map_upstream_errors():
                    response = await self._client.send(request, stream=True)
                if (
                    not follow
                    or route.redirects != "follow"
                    or response.status_code not in REDIRECT_STATUSES
                ):
                    if hops:
                        response.extensions[REDIRECTED_FROM] = hops
                    return response
                hops.append(response.headers)
                await response.aclose()
                request = self.redirected(request, response, route)
            raise UpstreamUnavailable(f"more than {route.max_redirects} redirects")
        except UpstreamError as exc:
            logger.warning(
                "upstream %s %s failed: %s (%s)",
                request.method,
                _safe_url(request.url),
                exc.reason,
                cause_of(exc) or "-",
            )
            raise

    def _pool_full(self) -> bool:
        return self._pool is not None and self._pool().in_use >= self._max_connections

    def redirected(
        self, request: httpx.Request, response: httpx.Response, route: Route
    ) -> httpx.Request:
        """The request that follows `response` (a redirect answering `request`) per the route's
        policy: allowed hosts only, credentials only to the same origin; raises
        UpstreamUnavailable saying why not."""
        try:
            url = next_hop(response, route)
        except ValueError as exc:
            logger.warning(
                "not following the redirect from %s: %s (Location %r)",
                _safe_url(request.url),
                exc,
                response.headers.get("location", "").split("?")[0][:200],
            )
            raise UpstreamUnavailable(f"redirect not followed: {exc}") from None
        if same_origin(url, request.url):
            dropped: frozenset[str] = frozenset({"host"})
        else:
            # Credentials are for their origin (scheme, host and port), not for wherever it
            # redirects: the route's own, and the client's where the route forwards them.
            dropped = _CREDENTIAL_HEADERS | {"host", route.auth_header.lower()}
        headers = [
            (name, value) for name, value in request.headers.multi_items() if name not in dropped
        ]
        method = request.method
        if response.status_code == 303 and method != "HEAD":
            method = "GET"
        return self.build_request(method, url, headers, route)


# Response extension: the headers of the redirects relay followed to reach this response,
# first hop first (the Hub's file metadata is on its redirect, not on the CDN's answer).
REDIRECTED_FROM = "relay.redirected_from"

_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


def _safe_url(url: httpx.URL) -> str:
    """The URL without its query, which may carry signatures or tokens."""
    return str(url.copy_with(query=None))


def _derived(request: httpx.Request, source: httpx.Request) -> httpx.Request:
    """`request`, made from `source`, with its marks: a continuation's, its authorizer."""
    if CONTINUATION in source.extensions:
        request.extensions[CONTINUATION] = source.extensions[CONTINUATION]
    return authorized_as(request, source)


def _monotonic() -> float:
    return asyncio.get_running_loop().time()


# Response extension: the index (in the route's `upstreams`) of the mirror that answered.
MIRROR_INDEX = "relay.mirror"


def mirror_place(response: httpx.Response) -> int | None:
    """The place in its route's `upstreams` (from 1, as in the metrics' `mirror` label) of
    the mirror that sent `response`; None on a route with one upstream."""
    index: int | None = response.extensions.get(MIRROR_INDEX)
    return None if index is None else index + 1


_Outcome = httpx.Response | UpstreamError


class _MirrorOpen:
    """One request over a route's mirrors: asked in turn (or hedged: the next one also asked
    when the first has not answered its head within `hedge_after`), the first answer that
    does not fall through returned. Every other response is closed here, each in this
    object's own `finally` (a hedge's loser included); the one returned is the caller's."""

    def __init__(
        self,
        upstream: Upstream,
        request: httpx.Request,
        route: Route,
        mirrors: RouteMirrors,
        current: int,
    ) -> None:
        self._upstream = upstream
        self._request = request
        self._route = route
        self._mirrors = mirrors
        self._current = current

    async def run(
        self, attempts: list[Attempt], *, follow: bool, background: bool
    ) -> httpx.Response:
        hedge = self._mirrors.hedge_after
        if hedge and not background and len(attempts) > 1:
            return await self._hedged(attempts, hedge, follow)
        for k, attempt in enumerate(attempts):
            outcome = await self._ask(attempt, follow, background)
            if self._settle(attempt, outcome, last=k == len(attempts) - 1):
                if isinstance(outcome, UpstreamError):
                    raise outcome
                return outcome
            if isinstance(outcome, httpx.Response):
                await asyncio.shield(outcome.aclose())
            self._mirrors.passed_on(attempt.index)
        raise AssertionError("the last mirror's outcome is always the request's")

    async def _hedged(self, attempts: list[Attempt], hedge: float, follow: bool) -> httpx.Response:
        """`run` with each attempt in a task of its own, the next one started when the
        others have not answered their head within `hedge` seconds (or have failed)."""
        queue = list(attempts)
        pending: dict[asyncio.Task[_Outcome], Attempt] = {}

        def launch() -> None:
            attempt = queue.pop(0)
            task = asyncio.ensure_future(self._ask(attempt, follow, False))
            pending[task] = attempt

        launch()
        try:
            while True:
                done, _ = await asyncio.wait(
                    pending, timeout=hedge if queue else None, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    launch()  # the head is late: ask the next mirror too
                    continue
                for task in done:
                    attempt = pending.pop(task)
                    outcome = task.result()
                    last = not queue and not pending
                    if self._settle(attempt, outcome, last):
                        if isinstance(outcome, UpstreamError):
                            raise outcome
                        return outcome
                    if isinstance(outcome, httpx.Response):
                        await asyncio.shield(outcome.aclose())
                    self._mirrors.passed_on(attempt.index)
                    if queue and not pending:
                        launch()
        finally:
            for task in pending:
                task.cancel()
            await _settled(list(pending))

    async def _ask(self, attempt: Attempt, follow: bool, background: bool) -> _Outcome:
        request = self._request
        if attempt.index != self._current:
            request = self._upstream.for_mirror(request, self._route, self._current, attempt.index)
        try:
            response = await self._upstream._open_authorized(
                request, self._route, attempt.index, follow=follow, background=background
            )
        except UpstreamError as exc:
            return exc
        response.extensions[MIRROR_INDEX] = attempt.index
        if attempt.index != self._current and CONTINUATION in request.extensions:
            response.extensions[SWITCHED_FROM] = self._current
        return response

    def _settle(self, attempt: Attempt, outcome: _Outcome, last: bool) -> bool:
        """Record what the mirror did; True when this outcome is the request's."""
        mirrors, policy = self._mirrors, self._mirrors.policy
        if isinstance(outcome, UpstreamError):
            if error_counts(outcome):
                mirrors.failed(attempt.index, outcome.reason)
            return last or not error_falls_through(policy, outcome)
        status = outcome.status_code
        if failed_status(status):
            mirrors.failed(attempt.index, f"answered {status}")
        else:
            mirrors.succeeded(attempt.index)
        if last or not falls_through(policy, status):
            return True
        logger.info(
            "mirror %d of %s answered %d: asking the next (%s)",
            attempt.index + 1,
            self._route.prefix,
            status,
            self._request.url.path,
        )
        return False


async def _settled(tasks: list[asyncio.Task[_Outcome]]) -> None:
    """Wait for cancelled attempts to end and close any response one got meanwhile; a
    cancellation of the caller is held until then, and raised after."""
    cancelled = False

    async def wait(future: asyncio.Future[object]) -> None:
        nonlocal cancelled
        while not future.done():
            try:
                await asyncio.wait({future})
            except asyncio.CancelledError:
                cancelled = True

    for task in tasks:
        await wait(task)  # type: ignore[arg-type]
        if task.cancelled() or task.exception() is not None:
            continue
        outcome = task.result()
        if isinstance(outcome, httpx.Response):
            await wait(asyncio.ensure_future(outcome.aclose()))
    if cancelled:
        raise asyncio.CancelledError
