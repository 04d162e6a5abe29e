"""Liveness and readiness, answered by relay itself whatever routes are mounted."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response


class Readiness:
    """Ready once the lifespan has started; not ready from the moment shutdown begins.

    With several workers, `server` speaks for the whole server (`relay.server.supervisor`):
    the reason it is not ready (draining, workers not all up), or None.
    """

    def __init__(self) -> None:
        self.started = False
        self.draining = False
        self.server: Callable[[], str | None] | None = None

    @property
    def ready(self) -> bool:
        return self.not_ready() is None

    def not_ready(self) -> str | None:
        """Why this server is not ready, or None when it is."""
        if self.draining:
            return "draining"
        if not self.started:
            return "starting"
        return self.server() if self.server is not None else None


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})


async def readyz(request: Request) -> Response:
    readiness: Readiness = request.app.state.readiness
    reason = readiness.not_ready()
    if reason is None:
        return PlainTextResponse("ready\n", headers={"Cache-Control": "no-store"})
    return PlainTextResponse(f"not ready: {reason}\n", 503, headers={"Cache-Control": "no-store"})
