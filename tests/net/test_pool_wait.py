"""POOL_WAIT: the transport records how long a request waited for a free upstream connection,
and only when it had to wait (the pool was full)."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest

from relay.config import Config
from relay.net.transports import ALLOW_PRIVATE, POOL_WAIT, make_transport
from tests.origin import Origin


def _request(url: str, pool: float) -> httpx.Request:
    timeout = {"connect": 5.0, "read": 5.0, "write": 5.0, "pool": pool}
    return httpx.Request("GET", url, extensions={"timeout": timeout, ALLOW_PRIVATE: True})


def _transport() -> httpx.AsyncBaseTransport:
    return make_transport(dataclasses.replace(Config(), max_connections=1))


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
        await asyncio.sleep(0.05)  # let it queue for the one connection (not a timing assert)
        assert not waiting.done()
        await holder.aread()
        await holder.aclose()
        response = await waiting
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
        await holder.aclose()
        wait = waiter.extensions[POOL_WAIT]
        assert isinstance(wait, float)
        assert wait > 0


async def _body(origin: Origin, size: int) -> bytes:
    async with httpx.AsyncClient() as client:
        return (await client.get(origin.url_for(f"/gen/{size}"))).content
