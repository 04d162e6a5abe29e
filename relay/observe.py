"""Per-request observation: the access log record and the metrics, read from the Exchange.

Plain ASGI middleware (not BaseHTTPMiddleware, which breaks streaming back-pressure). It wraps
`send` only to see the status; everything else is read once, after the request is over.
"""

from __future__ import annotations

from relay.exchange import SCOPE_KEY, Exchange
from relay.metrics import Metrics
from relay.types import ASGIApp, Message, Receive, Scope, Send


class ObserveMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        exchange = scope[SCOPE_KEY] = Exchange()
        status = 0

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.observe(scope, exchange, status)
