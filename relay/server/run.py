"""Running relay under uvicorn: the pinned HTTP parser, graceful drain, quiet aborts."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Generator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from types import FrameType
from typing import cast

import httpx
import uvicorn
from starlette.applications import Starlette

from relay.cache.clock import Clock
from relay.config import SINGLE_PROCESS, Config, WorkerInfo
from relay.errors import StartupError
from relay.server.app import create_app
from relay.server.health import Readiness
from relay.server.logs import configure_logging, log_startup
from relay.server.uvicorn_compat import HttpToolsProtocol, RequestResponseCycle
from relay.server.zerocopy import ZeroCopySend
from relay.types import RESET_KEY, ZERO_COPY_SEND

logger = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _Rejected(Exception):
    """Raised inside a parser callback; uvicorn then calls send_400_response."""


_BAD_REQUEST = (400, "Bad Request")


class RelayHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits a public-facing server needs.

    - httptools (llhttp) is pinned on purpose: it refuses Content-Length together with
      Transfer-Encoding, where h11 accepted it when tried.
    - Absolute-form targets (`GET http://elsewhere/ HTTP/1.1`) are how clients talk to
      forward proxies; relay is not one, so they get 400 before any routing.
    - One limit on the request head (request line plus headers, and a header count): 431.
    - A header-read timeout from the first byte of a request (or from the connection, for the
      first one) to the end of its headers: a slowloris client gets 408 and is closed. One
      timer per connection, re-armed from the deadline when it fires, instead of a timer per
      request (arming and cancelling one cost ~1.5 us of every small request).
    - RFC 9112 framing rules llhttp leaves to the server (3.2, 6.1): HTTP/1.1 without Host,
      more than one Host, and Transfer-Encoding on HTTP/1.0 get 400.
    - GET and HEAD carry no body on relay: one declared (Content-Length > 0 or
      Transfer-Encoding) gets 400 at once, before the app runs, instead of being read.
    - Any other body must arrive within `body_timeout` of the end of the headers (else 408)
      and be at most `max_body_bytes` (else 413); a trickled body cannot hold a connection.
    - On plain TCP, the ASGI Zero Copy Send extension (relay/server/zerocopy.py): cache hits
      go from the file to the socket with sendfile.
    """

    max_head_bytes = 16384
    max_header_count = 100
    header_timeout = 15.0
    body_timeout = 15.0
    max_body_bytes = 65536
    zero_copy = True

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._head_bytes = 0
        self._header_count = 0
        self._rejected: tuple[int, str] | None = None
        self._rejected_why: str | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_deadline: float | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._reset_framing()
        super().connection_made(transport)
        sock = transport.get_extra_info("socket")
        self._socket_fd: int | None = None
        plain_tcp = sock is not None and transport.get_extra_info("sslcontext") is None
        if self.zero_copy and plain_tcp and hasattr(os, "sendfile"):
            self._socket_fd = sock.fileno()
        # Pause the response as soon as the kernel has not taken all of a chunk (uvloop's
        # default waits for 64 KiB more): relay's back-pressure wait then returns only once
        # the client has taken the whole chunk, so a slow client holds one chunk, not two.
        transport.set_write_buffer_limits(high=0)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._disarm_body_timer()
        super().connection_lost(exc)

    def _reset_framing(self) -> None:
        self._host_count = 0
        self._chunked = False
        self._declared_length: int | None = None
        self._body_bytes = 0

    def _arm_head_timer(self) -> None:
        if self._head_deadline is not None:
            return  # a head is already being read: its deadline stands
        self._head_deadline = self.loop.time() + self.header_timeout
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_check)

    def _disarm_head_timer(self) -> None:
        # The timer stays scheduled: when it fires with no head being read it just ends, and
        # a request begun meanwhile has it re-armed for what is left of its own deadline.
        self._head_deadline = None

    def _head_check(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return
        left = deadline - self.loop.time()
        if left > 0:
            self._head_timer = self.loop.call_later(left, self._head_check)
            return
        self._head_deadline = None
        self._head_timed_out()

    def _head_timed_out(self) -> None:
        busy = self.cycle is not None and not self.cycle.response_complete
        if self.transport.is_closing() or busy:
            return
        self.transport.write(
            b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        self.transport.close()

    def _disarm_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.pipeline:
            # Queued behind a response still going out: reading is paused, not the client.
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)
            return
        self._refuse_body(408, "Request Timeout")

    def _refuse_body(self, status: int, reason: str) -> None:
        """Stop reading a body that is too slow or too large, answering if no response began.

        A response already under way (an app that answered without reading the body) is
        let finish, then the connection is closed instead of being kept alive.
        """
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and cycle.response_started:
            if cycle.response_complete:
                self.transport.close()
            else:
                cycle.keep_alive = False
            return
        logger.info("request body refused: %d %s", status, reason)
        self._write_refusal(status, reason)

    def _count(self, nbytes: int) -> None:
        self._head_bytes += nbytes
        if self._head_bytes > self.max_head_bytes or self._header_count > self.max_header_count:
            self._rejected = (431, "Request Header Fields Too Large")
            raise _Rejected

    def on_message_begin(self) -> None:
        self._head_bytes = 0
        self._header_count = 0
        self._reset_framing()
        self._arm_head_timer()
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._count(len(name) + len(value) + 4)
        lname = name.lower()
        if lname == b"host":
            self._host_count += 1
        elif lname == b"transfer-encoding":
            self._chunked = True
        elif lname == b"content-length" and value.strip().isdigit():
            # llhttp has already refused a second, differing Content-Length.
            self._declared_length = int(value.strip())
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_head_timer()
        if not self.url.startswith(b"/"):
            raise _Rejected("request target is not origin-form")
        self._check_framing()
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None:
            head = _HeadWithBody(self.transport, self.loop)
            cycle.transport = cast(asyncio.Transport, head)
            self.scope[RESET_KEY] = functools.partial(  # type: ignore[literal-required]
                self._reset_connection, weakref.ref(cycle)
            )
            if self._socket_fd is not None:
                self.scope.setdefault("extensions", {})[ZERO_COPY_SEND] = {}
                # The cycle runs the app with `self.send` (checked in uvicorn_compat).
                cycle.send = ZeroCopySend(  # type: ignore[method-assign, assignment]
                    cycle, head, self.transport, self._socket_fd, self.loop
                )
        if self._chunked or self._declared_length:
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)

    def _reset_connection(self, cycle_ref: weakref.ref[RequestResponseCycle]) -> None:
        """Abort with a TCP reset: a client being cut does not get what is still queued (a
        slow one would take minutes to drain the socket buffers before seeing the end).
        The request's cycle is marked disconnected at once (uvicorn learns of the abort only
        on a later loop turn): an app cut before its response started is not then answered
        with a 500 written to the closed transport. (Referred to weakly: the scope holds
        this, and the cycle holds the scope.)"""
        cycle = cycle_ref()
        if cycle is not None:
            cycle.disconnected = True
        if self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _check_framing(self) -> None:
        version = self.parser.get_http_version()
        if self._host_count > 1:
            self._reject(_BAD_REQUEST, "more than one Host header")
        if self._host_count == 0 and version != "1.0":
            self._reject(_BAD_REQUEST, "HTTP/1.1 request without a Host header")
        if self._chunked and version == "1.0":
            self._reject(_BAD_REQUEST, "Transfer-Encoding on an HTTP/1.0 request")
        has_body = self._chunked or bool(self._declared_length)
        if has_body and self.parser.get_method() in (b"GET", b"HEAD"):
            self._reject(_BAD_REQUEST, "a GET or HEAD request must not have a body")
        if self._declared_length is not None and self._declared_length > self.max_body_bytes:
            self._reject((413, "Content Too Large"), f"body over {self.max_body_bytes} bytes")

    def _reject(self, status: tuple[int, str], why: str) -> None:
        self._rejected = status
        self._rejected_why = why
        raise _Rejected(why)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.max_body_bytes:
            self._disarm_body_timer()
            self._refuse_body(413, "Content Too Large")
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._disarm_body_timer()
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        if self._rejected is None:
            super().send_400_response(msg)
            return
        status, reason = self._rejected
        self._write_refusal(status, reason, self._rejected_why)

    def _write_refusal(self, status: int, reason: str, why: str | None = None) -> None:
        body = f"{status} {why or reason}\n".encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason.encode(), len(body), body)
        )
        self.transport.close()


class _HeadWithBody:
    """What a response writes to: its head is held until the first body write, so a small
    response leaves in one write (one system call, one segment) instead of two.

    uvicorn writes the status line and headers as soon as the app sends them and the body
    separately; relay sends the first body chunk right after, in the same loop iteration.
    The head waits for that write or, when none comes (HEAD, 304), for the end of the
    iteration: never longer. Measured: ~+7% small requests per second.
    """

    __slots__ = ("_held", "_loop", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None
        self._started = False

    def write(self, data: bytes) -> None:
        if not self._started:
            self._started = True
            if not self._transport.is_closing():
                self._held = data
                self._loop.call_soon(self._release)
                return
        held = self._held
        if held is not None:
            self._held = None
            data = held + data
        self._transport.write(data)

    def flush(self) -> None:
        """Write the held head now (a zero-copy body goes to the socket, not through here)."""
        self._release()

    def _release(self) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if not self._transport.is_closing():
                self._transport.write(held)

    def close(self) -> None:
        self._release()
        self._transport.close()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def __getattr__(self, name: str) -> object:
        return getattr(self._transport, name)


def protocol_class(config: Config) -> type[RelayHttpToolsProtocol]:
    """The protocol with this config's limits (uvicorn instantiates the class itself)."""
    return type(
        "ConfiguredRelayHttpToolsProtocol",
        (RelayHttpToolsProtocol,),
        {
            "max_head_bytes": config.max_header_bytes,
            "header_timeout": config.header_timeout,
            "body_timeout": config.body_timeout,
            "max_body_bytes": config.max_body_bytes,
        },
    )


class RelayServer(uvicorn.Server):
    """uvicorn's server with a not-ready window before the drain, and a clean exit code.

    On SIGTERM or SIGINT: /readyz answers 503 at once; requests are still accepted for
    `shutdown_delay` seconds (so load balancers see not-ready before the listener closes); then
    the listener closes and in-flight downloads get up to `drain_timeout` seconds, after which
    they are cancelled, which aborts their connections (never a clean short body).
    """

    def __init__(
        self, config: uvicorn.Config, *, readiness: Readiness, shutdown_delay: float
    ) -> None:
        super().__init__(config)
        self._readiness = readiness
        self._shutdown_delay = shutdown_delay
        self._exit_requested_at: float | None = None
        self.on_started: Callable[[], None] | None = None
        """Called once the server listens (a worker tells its supervisor it is up)."""
        self.parent: int | None = None
        """A worker's supervisor: if the worker's parent changes, it shuts down."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._exit_requested_at is None:
            self._exit_requested_at = time.monotonic()
            self._readiness.draining = True
            logger.info(
                "shutdown requested: not ready; accepting for %.1fs, then draining for up to %.1fs",
                self._shutdown_delay,
                self.config.timeout_graceful_shutdown or 0,
            )
            if self._shutdown_delay <= 0:
                self.should_exit = True
        elif sig == signal.SIGINT:
            # A second Ctrl-C skips the drain.
            self.should_exit = self.force_exit = True

    @property
    def startup_error(self) -> StartupError | None:
        """Why the app refused to start (data_dir in use, unusable job store), if it did."""
        error = getattr(getattr(self.config.app, "state", None), "startup_error", None)
        return error if isinstance(error, StartupError) else None

    async def on_tick(self, counter: int) -> bool:
        if self.parent is not None and os.getppid() != self.parent:
            logger.warning("the supervisor is gone: shutting down")
            self.parent = None
            self.handle_exit(signal.SIGTERM, None)
        requested = self._exit_requested_at
        if requested is not None and time.monotonic() - requested >= self._shutdown_delay:
            self.should_exit = True
        return await super().on_tick(counter)

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the captured signal after shutting down, which would make a clean
        # drain exit with 143; relay exits 0 after a graceful shutdown.
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled on the main thread (embedded, tests)
            return
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def event_loop(config: Config) -> str:
    """The event loop: uvloop for `loop = "auto"` (the one relay's figures were measured on)."""
    return "uvloop" if config.loop == "auto" else config.loop


def uvicorn_config(config: Config, app: Starlette) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        http=protocol_class(config),
        loop=event_loop(config),
        lifespan="on",
        ws="none",
        interface="asgi3",
        # relay decides which X-Forwarded-* to trust; uvicorn must not rewrite the peer.
        proxy_headers=False,
        server_header=False,
        date_header=True,
        access_log=False,
        log_config=None,
        timeout_keep_alive=int(max(1, config.keepalive_timeout)),
        timeout_graceful_shutdown=int(config.drain_timeout + 0.999),
        backlog=2048,
    )


def build_server(
    config: Config,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
    clock: Clock | None = None,
    worker: WorkerInfo = SINGLE_PROCESS,
) -> RelayServer:
    """`clock`: the time the cache reads (tests: `relay.cache.clock.ManualClock`)."""
    app = create_app(config, transport=transport, clock=clock, worker=worker)
    return RelayServer(
        uvicorn_config(config, app),
        readiness=app.state.readiness,
        shutdown_delay=config.shutdown_delay,
    )


def _long_lived_heap() -> None:
    # Everything alive now (modules, config, app) lives as long as the process: keep it out of
    # the collector's scans. A small request allocates thousands of short-lived container
    # objects; collecting the youngest generation every 700 of them cost ~8% of its CPU.
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 1000)


def serve(config: Config) -> int:
    """Run relay until it is stopped, as one process or under a supervisor (`workers`); the
    exit code. Raises StartupError if it could not start."""
    configure_logging(config.log_level, config.log_format)
    log_startup(config)
    if config.workers > 1:
        from relay.server.supervisor import supervise

        return supervise(config)
    server = build_server(config)
    _long_lived_heap()
    try:
        server.run()
    except SystemExit:
        # uvicorn exits 3 when the lifespan fails; relay says why in one line instead.
        if server.startup_error is not None:
            raise server.startup_error from None
        raise
    return 0


def serve_worker(
    config: Config, worker: WorkerInfo, sock: socket.socket, status: Connection
) -> int:
    """One worker under the supervisor (relay/server/supervisor.py): today's server on the
    shared socket and on its peer socket; it tells the supervisor when it is up, or why it
    could not start (the supervisor prints that once)."""
    configure_logging(config.log_level, config.log_format, worker=worker.index)
    server = build_server(config, worker=worker)
    server.parent = os.getppid()
    server.on_started = lambda: status.send(("up", None))
    peer_path = worker.peer_socket(worker.index)
    with contextlib.suppress(FileNotFoundError):
        peer_path.unlink()  # left by this index's previous process
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    peer.bind(str(peer_path))
    peer.listen(128)
    _long_lived_heap()
    try:
        server.run(sockets=[sock, peer])
    except SystemExit as exc:
        error = server.startup_error
        if error is not None:
            status.send(("failed", str(error)))
            return 1
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        peer.close()
        with contextlib.suppress(OSError):
            peer_path.unlink()
    return 0
