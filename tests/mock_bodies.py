"""A response body for upstreams scripted on httpx.MockTransport: given bytes, maybe cut."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx


class ChunkedBody(httpx.AsyncByteStream):
    """`data` in 1000-byte chunks; with `cut`, a connection reset after them. Records
    whether it was closed (`closed`), so a test can check every response was released."""

    def __init__(self, data: bytes, *, cut: bool = False) -> None:
        self.data, self.cut, self.closed = data, cut, False

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), 1000):
            yield self.data[i : i + 1000]
        if self.cut:
            raise httpx.ReadError("connection reset")

    async def aclose(self) -> None:
        self.closed = True
