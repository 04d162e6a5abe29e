"""Upstream socket reads of a size relay chooses.

For a plain protocol, uvloop and asyncio read up to 256 KiB per `recv`, and aiohttp's protocol
is a plain one. Whatever one read returns stays in memory until relay's client has taken it, so
with a client slower than the upstream every stream held about two such reads (one being written
to the client, one read ahead). `SizedReads` makes the transport read into a buffer of ours
(`asyncio.BufferedProtocol`, which both loops support), so relay picks the size per connection
(relay/proxy/pacing.py decides): large for a fast stream, so it costs few iterations per GiB, and
small for a slow one, so it holds little. The TCP window is not touched: a slow client does not
slow the upstream connection's kernel buffering, only how much of it relay copies out at once.
"""

from __future__ import annotations

import asyncio
import threading

LARGE_READ = 1024 * 1024
"""Bytes per read for a fast stream. uvloop and asyncio read 256 KiB on their own; measured
on 1 GiB streams (bench/, this machine): 256 KiB 1.2 GB/s at 0.89 CPU-s/GiB, 512 KiB 1.67 GB/s
at 0.55, 1 MiB 1.88 GB/s at 0.47. A fast stream holds up to about two reads."""

SMALL_READ = 64 * 1024
"""Bytes per read for a slow stream (relay/proxy/pacing.py): what a slow client makes relay hold."""


class _Buffers(threading.local):
    """One read buffer per thread (per event loop): a read is copied out before the next."""

    def __init__(self) -> None:
        self.large = memoryview(bytearray(LARGE_READ))
        self.small = self.large[:SMALL_READ]


_BUFFERS = _Buffers()


class SizedReads(asyncio.BufferedProtocol):
    """Stands between a transport and a plain protocol: the transport reads into this thread's
    buffer, at most `SMALL_READ` or `LARGE_READ` bytes, and the protocol gets a copy of what
    arrived, as `data_received` would have given it.

    Installed with `transport.set_protocol(SizedReads(protocol))` once the connection is made;
    the protocol keeps its transport and still pauses and resumes reading on it.
    """

    __slots__ = ("_buffer", "_protocol")

    def __init__(self, protocol: asyncio.Protocol) -> None:
        self._protocol = protocol
        self._buffer = _BUFFERS.large

    @property
    def small(self) -> bool:
        return len(self._buffer) == SMALL_READ

    def read_small(self, small: bool) -> None:
        """Small reads from now on (the client is slow), or large ones again."""
        self._buffer = _BUFFERS.small if small else _BUFFERS.large

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self._protocol.data_received(self._buffer[:nbytes].tobytes())

    def eof_received(self) -> bool | None:
        return self._protocol.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.connection_lost(exc)

    def pause_writing(self) -> None:
        self._protocol.pause_writing()

    def resume_writing(self) -> None:
        self._protocol.resume_writing()
