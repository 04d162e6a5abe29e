"""Answers decided before they start: a request whose answer depends on an upstream exchange
of its own first (the Hub's file metadata, a registry's tag HEAD or token) takes its stream
slot, waits for that under a disconnect watch, then hands the slot to the answer chosen."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from starlette.responses import Response

from relay.errors import RelayError, UpstreamError
from relay.proxy.admission import StreamLimiter, hand_over
from relay.proxy.exchange import exchange_of
from relay.proxy.send_watch import ClientWatch
from relay.types import Receive, Scope, Send


async def decided(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    limiter: StreamLimiter,
    client: str | None,
    decide: Callable[[], Awaitable[Response]],
    render: Callable[[RelayError], Response],
) -> Response | None:
    """The answer `decide` chooses (a RelayError it raises: `render`ed), holding the request's
    stream slot if it takes one (it must then be called at once; else the slot is released
    here). None when there is nothing more to send: refused (answered here), or the client
    left while `decide` waited."""
    exchange = exchange_of(scope)
    refusal = limiter.acquire(client)
    if refusal is not None:
        exchange.outcome = "rejected"
        await render(refusal)(scope, receive, send)
        return None
    task = asyncio.current_task()
    assert task is not None
    watch = ClientWatch(receive, task)
    answer: Response | None = None
    try:
        answer = await decide()
    except RelayError as exc:
        if isinstance(exc, UpstreamError):
            exchange.outcome = "upstream_error"
        answer = render(exc)
    except asyncio.CancelledError:
        if not watch.gone:
            raise
        task.uncancel()
        exchange.outcome = "client_abort"
        return None
    finally:
        watch.stop()
        # The cached or relayed response is handed this request's slot (and releases it):
        # never refused halfway. An error answer needs none.
        if answer is None or not hand_over(answer):
            limiter.release(client)
    return answer
