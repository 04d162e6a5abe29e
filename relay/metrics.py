"""Prometheus metrics (stub: implemented in the observability change)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from relay.exchange import Exchange
from relay.types import Scope


class Metrics:
    def observe(self, scope: Scope, exchange: Exchange, status: int) -> None:
        pass

    async def endpoint(self, request: Request) -> Response:
        return PlainTextResponse("")
