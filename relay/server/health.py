"""Liveness and readiness, answered by relay itself whatever routes are mounted."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from relay.net.mirrors import MirrorBoard


class Readiness:
    """Ready once the lifespan has started; not ready from the moment shutdown begins."""

    def __init__(self) -> None:
        self.started = False
        self.draining = False

    @property
    def ready(self) -> bool:
        return self.started and not self.draining


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n", headers={"Cache-Control": "no-store"})


async def readyz(request: Request) -> Response:
    """Ready or not; then, in detail, each mirror of the routes that have several (a mirror
    resting after failures does not make relay unready: other routes, and the cache, still
    serve)."""
    readiness: Readiness = request.app.state.readiness
    if readiness.ready:
        mirrors: MirrorBoard | None = getattr(request.app.state, "mirrors", None)
        detail = "".join(f"{line}\n" for line in mirrors.report()) if mirrors else ""
        return PlainTextResponse("ready\n" + detail, headers={"Cache-Control": "no-store"})
    reason = "draining" if readiness.draining else "starting"
    return PlainTextResponse(f"not ready: {reason}\n", 503, headers={"Cache-Control": "no-store"})
