"""A registry answer relayed without the cache (or where the cache does not take it): opened
with relay's token dance, its non-200 answers turned into registry errors, a 200 relayed by
`RelayResponse` with the registry's head and, where the digest is known, its body checked
(the last chunk held until the sha256 matches; a mismatch aborts the transfer)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx
from starlette.responses import Response

from relay.config import Config
from relay.errors import UpstreamError
from relay.net.routing import RouteTable, Target
from relay.proxy.admission import StreamLimiter
from relay.proxy.exchange import exchange_of
from relay.proxy.streaming import RelayResponse
from relay.registry.errors import error_response
from relay.registry.heads import Adapt
from relay.registry.names import RegistryRequest
from relay.registry.upstream import RegistryUpstream, refusal, upstream_failure
from relay.types import Receive, Scope, Send


@dataclass(frozen=True, slots=True)
class Relaying:
    """What every relayed registry answer needs of relay."""

    upstream: RegistryUpstream
    routes: RouteTable
    limiter: StreamLimiter
    config: Config
    client: str | None


class RegistryRelay(Response):
    """Relays one registry request (see the module). Takes a stream slot when called, or is
    handed one (`take_slot`); `opened`: an upstream response already open (a cache fill's
    answer it did not keep), now this response's to close."""

    def __init__(
        self,
        relaying: Relaying,
        method: str,
        request: RegistryRequest,
        headers: list[tuple[str, str]],
        *,
        adapt: Adapt,
        sha256: str | None = None,
        path: str | None = None,
        opened: httpx.Response | None = None,
    ) -> None:
        self._relaying = relaying
        self._method = method
        self._request = request
        self._upstream_headers = headers
        self._adapt = adapt
        self._sha256 = sha256
        self._path = path
        self._opened = opened
        self._slot_held = False
        self.status_code = 0

    def take_slot(self) -> None:
        self._slot_held = True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relaying = self._relaying
        opened = self._opened
        self._opened = None
        holding = handed = False
        try:
            if not self._slot_held:
                refused = relaying.limiter.acquire(relaying.client)
                if refused is not None:
                    exchange_of(scope).outcome = "rejected"
                    await error_response(refused)(scope, receive, send)
                    return
            holding = True
            answer: Response
            try:
                if opened is None:
                    opened = await relaying.upstream.open(
                        self._method, self._request, self._upstream_headers, path=self._path
                    )
            except UpstreamError as exc:
                exchange_of(scope).outcome = "upstream_error"
                answer = error_response(upstream_failure(exc))
            else:
                if opened.status_code in (200, 206):
                    answer = self._relayed(opened)
                    opened = None  # the relayed response owns it now
                    answer.take_slot()
                    handed = True
                else:
                    problem = await refusal(opened, self._request)
                    opened = None
                    answer = error_response(problem)
            self.status_code = answer.status_code
            await answer(scope, receive, send)
            self.status_code = answer.status_code
        finally:
            if opened is not None:
                await asyncio.shield(opened.aclose())
            if holding and not handed:
                relaying.limiter.release(relaying.client)

    def _relayed(self, opened: httpx.Response) -> RelayResponse:
        relaying = self._relaying
        route = self._request.route
        assert route is not None
        return RelayResponse(
            relaying.upstream.upstream,
            self._method,
            Target(route=route, rest=self._path or self._request.upstream_path),
            [],
            routes=relaying.routes,
            limiter=relaying.limiter,
            client=relaying.client,
            config=relaying.config,
            opened=opened,
            sha256=self._sha256,  # checked on a whole body (a 200, a 206 of it all) only
            adapt=self._adapt,
        )
