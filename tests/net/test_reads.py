"""SizedReads over real loopback sockets, on asyncio and uvloop, in the clear and over TLS,
and its hook into the aiohttp transport."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

import httpx
import pytest
import trustme

from relay.net.transports import ALLOW_PRIVATE, READ_PACE
from relay.net.transports.aiohttp_transport import AiohttpTransport
from relay.net.transports.reads import LARGE_READ, SMALL_READ, SizedReads
from tests.loopback import LoopbackServer
from tests.origin import Origin, expected_sha256

BODY = bytes(range(256)) * (4 * 1024 * 16)  # 4 MiB


def run(loop_name: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    if loop_name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


class Recorder(asyncio.Protocol):
    """A plain protocol, as aiohttp's is; SizedReads is installed once connected."""

    def __init__(self, small: bool) -> None:
        self.small = small
        self.chunks: list[bytes] = []
        self.eof = False
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.reads: SizedReads | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.reads = SizedReads(self)
        self.reads.read_small(self.small)
        transport.set_protocol(self.reads)

    def data_received(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.chunks.append(data)

    def eof_received(self) -> bool | None:
        self.eof = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)


@pytest.fixture(scope="module")
def certs() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.mark.e2e  # a server on loopback (tests/conftest.py)
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("small", [False, True], ids=["large", "small"])
def test_reads_are_capped_and_bytes_unchanged(
    loop_name: str, tls: bool, small: bool, certs: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = certs

    async def main() -> None:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(BODY)  # all at once: the reader's side always has a lot to read
            await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
                await reader.read()  # until the client closes
            writer.close()
            served.set_result(None)

        served: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx if tls else None)
        LoopbackServer.started()
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        transport, recorder = await loop.create_connection(
            lambda: Recorder(small),
            "127.0.0.1",
            port,
            ssl=client_ctx if tls else None,
            server_hostname="127.0.0.1" if tls else None,
        )
        try:
            await asyncio.wait_for(asyncio.shield(recorder.lost), 30)
        finally:
            transport.close()
            await asyncio.wait_for(served, 30)
            server.close()
            await server.wait_closed()
        received = b"".join(recorder.chunks)
        assert hashlib.sha256(received).digest() == hashlib.sha256(BODY).digest()
        assert max(len(c) for c in recorder.chunks) <= (SMALL_READ if small else LARGE_READ)
        assert recorder.eof or tls  # TLS ends with close_notify and connection_lost

    run(loop_name, main)


def test_the_buffer_offered_to_the_transport_is_the_chosen_size() -> None:
    """What the loops read into: at most this many bytes per read."""

    async def main() -> None:
        reads = SizedReads(asyncio.Protocol())
        assert len(reads.get_buffer(-1)) == LARGE_READ
        reads.read_small(True)
        assert len(reads.get_buffer(-1)) == SMALL_READ
        assert reads.small
        reads.read_small(False)
        assert len(reads.get_buffer(-1)) == LARGE_READ

    run("asyncio", main)


@pytest.mark.e2e
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_aiohttp_connections_read_through_sized_reads(origin: Origin, loop_name: str) -> None:
    """The hook into aiohttp (its connector's protocol factory) is in place: if an aiohttp
    release moved it, this fails instead of relay silently reading 256 KiB at a time."""
    size = 8 * 1024 * 1024

    async def main() -> None:
        async with AiohttpTransport() as transport, httpx.AsyncClient(transport=transport) as c:
            request = c.build_request(
                "GET", f"{origin.url}/gen/{size}", extensions={ALLOW_PRIVATE: True}
            )
            response = await c.send(request, stream=True)
            try:
                pace = response.extensions[READ_PACE]
                assert isinstance(pace.__self__, SizedReads)
                reads: SizedReads = pace.__self__
                pace(True)
                assert reads.small
                digest = hashlib.sha256()
                async for chunk in response.aiter_raw():
                    digest.update(chunk)
                assert digest.hexdigest() == expected_sha256(size)
            finally:
                await response.aclose()
            # The next response on the kept-alive connection starts with large reads again.
            response = await c.send(request, stream=True)
            try:
                assert response.extensions[READ_PACE].__self__ is reads
                assert not reads.small
            finally:
                await response.aclose()

    run(loop_name, main)
