"""The response head is written together with the first body chunk, never later than the
end of the loop iteration it was sent in."""

from __future__ import annotations

import asyncio
from typing import Any

from relay.server.run import _HeadWithBody


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "write after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else None


def make() -> tuple[FakeTransport, Any]:
    real = FakeTransport()
    return real, _HeadWithBody(real, asyncio.get_running_loop())  # type: ignore[arg-type]


async def test_head_and_first_chunk_leave_in_one_write() -> None:
    real, transport = make()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    assert real.writes == []
    transport.write(b"body-1")
    transport.write(b"body-2")
    assert real.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody-1", b"body-2"]
    await asyncio.sleep(0)
    assert len(real.writes) == 2  # nothing written twice


async def test_a_head_without_body_leaves_at_the_end_of_the_iteration() -> None:
    real, transport = make()
    transport.write(b"HTTP/1.1 304 Not Modified\r\n\r\n")
    assert real.writes == []
    await asyncio.sleep(0)
    assert real.writes == [b"HTTP/1.1 304 Not Modified\r\n\r\n"]
    transport.write(b"")  # uvicorn's end of an empty body
    assert real.writes[-1] == b""


async def test_close_writes_the_held_head_first() -> None:
    real, transport = make()
    transport.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n")
    transport.close()
    assert real.writes == [b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"]
    assert transport.is_closing()
    await asyncio.sleep(0)
    assert len(real.writes) == 1


async def test_nothing_is_written_to_a_connection_that_closed_meanwhile() -> None:
    real, transport = make()
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    real.closing = True  # the client went away; uvicorn closed the transport itself
    await asyncio.sleep(0)
    assert real.writes == []


async def test_other_attributes_are_the_real_transports() -> None:
    _, transport = make()
    assert transport.get_extra_info("peername") == ("127.0.0.1", 1)
