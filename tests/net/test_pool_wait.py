"""POOL_WAIT: the transport records how long a request waited for a free upstream connection,
and only when it had to wait (the pool was full); it counts the requests waiting."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import Callable

import httpx
import pytest

from relay.config import Config
from relay.net.transports import ALLOW_PRIVATE, POOL_WAIT, make_transport
from relay.net.transports.aiohttp_transport import AiohttpTransport
from tests.origin import Origin

pytestmark = pytest.mark.e2e


def _request(url: str, pool: float) -> httpx.Request:
    timeout = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": pool}
    return httpx.Request("GET", url, extensions={"timeout": timeout, ALLOW_PRIVATE: True})


def _transport() -> httpx.AsyncBaseTransport:
    return make_transport(dataclasses.replace(Config(), max_connections=1))


def _waiting(transport: httpx.AsyncBaseTransport) -> int:
    assert isinstance(transport, AiohttpTransport)
    return transport.requests_waiting()


async def _until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Let the loop run until predicate() is true (bounded); whether it became true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.001)
    return True


async def test_pool_wait_absent_when_a_connection_was_free(origin: Origin) -> None:
    transport = _transport()
    async with transport:
        request = _request(origin.url_for("/gen/10"), pool=5.0)
        response = await transport.handle_async_request(request)
        await response.aread()
        await response.aclose()
        assert response.status_code == 200
        assert POOL_WAIT not in request.extensions


async def test_pool_wait_recorded_when_the_request_waited(origin: Origin) -> None:
    transport = _transport()
    async with transport:
        holder = await transport.handle_async_request(_request(origin.url_for("/gen/10"), 5.0))
        waiter = _request(origin.url_for("/gen/20"), pool=5.0)
        waiting = asyncio.ensure_future(transport.handle_async_request(waiter))
        # The request is queued for the one connection (the transport counts it), not slow.
        assert await _until(lambda: _waiting(transport) == 1)
        assert not waiting.done()
        await holder.aread()
        await holder.aclose()
        response = await waiting
        assert _waiting(transport) == 0
        assert (await response.aread()) == await _body(origin, 20)
        await response.aclose()
        wait = waiter.extensions[POOL_WAIT]
        assert isinstance(wait, float)
        assert wait > 0


async def test_pool_wait_recorded_when_the_wait_timed_out(origin: Origin) -> None:
    transport = _transport()
    async with transport:
        holder = await transport.handle_async_request(_request(origin.url_for("/gen/10"), 5.0))
        waiter = _request(origin.url_for("/gen/20"), pool=0.05)
        with pytest.raises(httpx.PoolTimeout):
            await transport.handle_async_request(waiter)
        assert _waiting(transport) == 0
        await holder.aclose()
        wait = waiter.extensions[POOL_WAIT]
        assert isinstance(wait, float)
        assert wait > 0


async def test_pool_waiting_count_falls_when_a_waiting_request_is_cancelled(
    origin: Origin,
) -> None:
    """A request cancelled while it waits (its client left) is no longer counted, and never
    takes the connection freed after it."""
    transport = _transport()
    async with transport:
        holder = await transport.handle_async_request(_request(origin.url_for("/gen/10"), 5.0))
        marker = uuid.uuid4().hex
        waiting = asyncio.ensure_future(
            transport.handle_async_request(_request(origin.url_for("/gen/30", m=marker), 5.0))
        )
        assert await _until(lambda: _waiting(transport) == 1)
        waiting.cancel()
        assert await _until(waiting.done)
        assert _waiting(transport) == 0
        await holder.aclose()
        follower = _request(origin.url_for("/gen/10"), pool=5.0)
        response = await transport.handle_async_request(follower)
        await response.aread()
        await response.aclose()
        assert POOL_WAIT not in follower.extensions
    assert not [r for r in origin.requests if marker in r.target]


async def _body(origin: Origin, size: int) -> bytes:
    async with httpx.AsyncClient() as client:
        return (await client.get(origin.url_for(f"/gen/{size}"))).content
