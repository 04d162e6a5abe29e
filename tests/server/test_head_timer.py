"""The request-head timeout: one timer per connection, re-armed from each head's deadline.

The protocol runs on the real loop (its request tasks too) with its clock and timers replaced
by a manual clock: time is moved forward and due timers are run by the test."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from relay.server.run import RelayHttpToolsProtocol
from relay.types import Receive, Scope, Send


class Timer:
    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualLoop:
    """The running loop, but for time and timers, which the test drives."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.now = 1000.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> Timer:
        timer = Timer(self.now + delay, callback, args)
        self.timers.append(timer)
        return timer

    def pending(self) -> list[Timer]:
        return [t for t in self.timers if not t.cancelled and t.when > -1]

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer in sorted(self.pending(), key=lambda t: t.when):
            if timer.when <= self.now:
                timer.when = -2  # run once
                timer.callback(*timer.args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5), "sockname": ("127.0.0.1", 6)}.get(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


class Protocol(RelayHttpToolsProtocol):
    header_timeout = 10.0


async def connect() -> tuple[Protocol, Transport, ManualLoop]:
    loop = ManualLoop(asyncio.get_running_loop())
    config = uvicorn.Config(
        app, http=Protocol, lifespan="off", log_config=None, ws="none", timeout_keep_alive=100
    )
    config.load()
    protocol = Protocol(config=config, server_state=ServerState(), app_state={}, _loop=loop)  # type: ignore[arg-type]
    transport = Transport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport, loop


async def answered(transport: Transport, count: int) -> None:
    while transport.written.count(b"HTTP/1.1 204") < count:
        await asyncio.sleep(0)


async def test_a_head_still_incomplete_at_its_deadline_gets_408() -> None:
    protocol, transport, loop = await connect()
    loop.advance(3)
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")
    loop.advance(6.9)  # 9.9 s after the connection was made
    assert transport.written == b""
    loop.advance(0.2)
    assert transport.written.startswith(b"HTTP/1.1 408")
    assert transport.closed


async def test_each_head_on_a_kept_alive_connection_has_its_own_deadline() -> None:
    protocol, transport, loop = await connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
    await answered(transport, 1)
    loop.advance(8)
    protocol.data_received(b"GET / HTTP/1.1\r\nHo")  # the second head begins at 8 s...
    loop.advance(4)  # ...so at 12 s the connection's first deadline has passed, not its own
    assert b"408" not in transport.written
    loop.advance(5.9)
    assert b"408" not in transport.written
    loop.advance(0.2)  # 10 s after its first byte
    assert b"HTTP/1.1 408" in transport.written


async def test_the_timer_fired_while_idle_cuts_nothing() -> None:
    protocol, transport, loop = await connect()
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
    await answered(transport, 1)
    loop.advance(60)  # kept alive, idle: no head is being read
    assert not transport.closed
    protocol.data_received(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
    await answered(transport, 2)
    assert b"408" not in transport.written


async def test_heads_do_not_each_arm_a_timer() -> None:
    """Arming and cancelling a timer per request was a measurable share of a small
    request's CPU: one timer per connection stands for every head read on it."""
    protocol, transport, loop = await connect()
    for n in range(1, 4):
        protocol.data_received(b"GET / HTTP/1.1\r\nHost: r\r\n\r\n")
        await answered(transport, n)
    head_timers = [t for t in loop.timers if t.callback == protocol._head_check]
    assert len(head_timers) == 1
