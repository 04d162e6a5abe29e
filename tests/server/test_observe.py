"""ObserveMiddleware: the request id, the access record, and staying out of the body's way."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from relay.proxy.exchange import exchange_of
from relay.server.logs import configure_logging, direct_json_handler
from relay.server.metrics import Metrics
from relay.server.observe import ObserveMiddleware
from relay.types import REQUEST_ID_KEY, Message, Receive, Scope, Send
from tests.asgi import Client, http_scope
from tests.harness import RelayThread, wait_until
from tests.origin import Origin

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "relay.access"]


def fields(record: logging.LogRecord) -> dict[str, Any]:
    return dict(vars(record))


def one_access_record(caplog: pytest.LogCaptureFixture, request_id: str) -> dict[str, Any]:
    assert wait_until(
        lambda: any(fields(r)["request_id"] == request_id for r in access_records(caplog))
    )
    matching = [fields(r) for r in access_records(caplog) if fields(r)["request_id"] == request_id]
    assert len(matching) == 1
    return matching[0]


@pytest.fixture
def access_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="relay.access")
    return caplog


@pytest.mark.e2e
def test_access_record_of_a_download(
    make_relay: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    """One INFO record on relay.access with the request's fields; the query is never logged."""
    relay = make_relay()
    response = httpx.get(
        f"{relay.url}/o/gen/100000?sig=s3cret",
        headers={"Range": "bytes=0-99", "User-Agent": "test-agent/1", "X-Request-ID": "dl-1"},
    )
    assert response.status_code == 206
    record = one_access_record(access_log, "dl-1")
    assert record["levelname"] == "INFO"
    assert record["method"] == "GET"
    assert record["path"] == "/o/gen/100000"
    assert record["route"] == "/o/"
    assert record["status"] == 206
    assert record["bytes"] == 100
    assert record["upstream_status"] == 206
    assert record["upstream_ttfb_ms"] is not None
    assert record["duration_ms"] >= record["upstream_ttfb_ms"] >= 0
    assert record["range"] == "bytes=0-99"
    assert record["client"] == "127.0.0.1"
    assert record["outcome"] == "ok"
    assert record["resumes"] == 0
    assert record["user_agent"] == "test-agent/1"
    assert all("s3cret" not in str(v) for v in record.values())
    assert "s3cret" not in access_log.text


@pytest.mark.e2e
def test_access_record_of_an_upstream_abort(
    make_relay: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    relay = make_relay(resume_attempts=0)
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=10) as client,
        client.stream(
            "GET", f"{relay.url}/o/gen/1m?close_after=40000", headers={"X-Request-ID": "ab-1"}
        ) as response,
    ):
        for _ in response.iter_raw():
            pass
    record = one_access_record(access_log, "ab-1")
    assert record["status"] == 200
    assert record["outcome"] == "upstream_abort"
    assert record["bytes"] == 40000


@pytest.mark.e2e
def test_access_record_of_a_client_abort(
    make_relay: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    relay = make_relay()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=10) as sock:
        sock.sendall(b"GET /o/gen/64m HTTP/1.1\r\nHost: relay\r\nX-Request-ID: gone-1\r\n\r\n")
        got = 0
        while got < 64 * 1024:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += len(chunk)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    record = one_access_record(access_log, "gone-1")
    assert record["status"] == 200
    assert record["outcome"] == "client_abort"
    assert 0 < record["bytes"] < 64 * 1024 * 1024


@pytest.mark.e2e
def test_access_record_of_no_route(
    make_relay: Callable[..., RelayThread], access_log: pytest.LogCaptureFixture
) -> None:
    relay = make_relay()
    response = httpx.get(f"{relay.url}/nothing", headers={"X-Request-ID": "nr-1"})
    assert response.status_code == 404
    record = one_access_record(access_log, "nr-1")
    assert record["route"] == "-"
    assert record["outcome"] == "rejected"
    assert record["upstream_status"] is None
    assert record["bytes"] == len(response.content)


@pytest.mark.e2e
@pytest.mark.parametrize("sent", ["abc-123.X_y", "x" * 128], ids=["plain", "longest"])
def test_request_id_sane_client_id_is_echoed(
    make_relay: Callable[..., RelayThread], sent: str
) -> None:
    relay = make_relay()
    response = httpx.get(f"{relay.url}/o/gen/10", headers={"X-Request-ID": sent})
    assert response.headers.get_list("x-request-id") == [sent]


@pytest.mark.e2e
@pytest.mark.parametrize("sent", ["has space", "x" * 129, "semi;colon", "", "ü"], ids=repr)
def test_request_id_insane_client_id_is_replaced(
    make_relay: Callable[..., RelayThread], sent: str
) -> None:
    relay = make_relay()
    response = httpx.get(f"{relay.url}/o/gen/10", headers={b"X-Request-ID": sent.encode()})
    assert GENERATED_ID.fullmatch(response.headers["x-request-id"])


@pytest.mark.e2e
def test_request_id_generated_for_every_response(make_relay: Callable[..., RelayThread]) -> None:
    """Without a client id each response gets its own, also on relay's own answers."""
    relay = make_relay()
    ids = {httpx.get(f"{relay.url}{path}").headers["x-request-id"] for path in ("/o/gen/1", "/x")}
    assert len(ids) == 2
    assert all(GENERATED_ID.fullmatch(i) for i in ids)


@pytest.mark.e2e
def test_request_id_replaces_the_upstream_one(make_relay: Callable[..., RelayThread]) -> None:
    relay = make_relay()
    response = httpx.get(
        f"{relay.url}/o/headers",
        params={"set": "X-Request-ID: from-upstream"},
        headers={"X-Request-ID": "mine"},
    )
    assert response.status_code == 200
    assert response.headers.get_list("x-request-id") == ["mine"]


@pytest.mark.e2e
def test_request_id_goes_upstream(make_relay: Callable[..., RelayThread], origin: Origin) -> None:
    """The upstream sees the id the client gets back: one id end to end."""
    relay = make_relay()
    marker = uuid.uuid4().hex
    response = httpx.get(f"{relay.url}/o/gen/10?m={marker}")
    (seen,) = [r for r in origin.requests if marker in r.target]
    assert seen.header_all("x-request-id") == [response.headers["x-request-id"]]


def observed(app: Callable[[Scope, Receive, Send], Any], **kwargs: Any) -> ObserveMiddleware:
    return ObserveMiddleware(app, metrics=Metrics(), **kwargs)


async def test_request_id_is_in_the_scope_for_the_upstream() -> None:
    """The id the client gets back is the one the app finds in the scope."""
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope[REQUEST_ID_KEY])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    client = Client()
    await observed(app)(http_scope({}, "/x"), client.receive, client.send)
    assert seen == [client.headers[b"x-request-id"].decode()]


async def test_observe_passes_body_messages_through_untouched() -> None:
    """Body messages reach the server as the very objects the app sent (no copy per chunk)."""
    bodies = [{"type": "http.response.body", "body": b"x", "more_body": True} for _ in range(3)]
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for message in bodies:
            await send(message)

    async def send(message: Message) -> None:
        received.append(message)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    await observed(app)(http_scope({}, "/x"), receive, send)
    assert all(a is b for a, b in zip(received[1:], bodies, strict=True))


async def test_observe_error_before_response_is_logged_as_500(
    access_log: pytest.LogCaptureFixture,
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        exchange_of(scope).route = "/o/"
        raise RuntimeError("bug")

    client = Client()
    with pytest.raises(RuntimeError):
        await observed(app)(http_scope({}, "/o/x"), client.receive, client.send)
    (record,) = access_records(access_log)
    assert fields(record)["status"] == 500
    assert fields(record)["outcome"] == "error"


async def test_observe_cancelled_request_is_logged_as_cancelled(
    access_log: pytest.LogCaptureFixture,
) -> None:
    """A download cancelled by the drain timeout is logged, not lost."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await asyncio.Event().wait()

    client = Client()
    task = asyncio.ensure_future(observed(app)(http_scope({}, "/x"), client.receive, client.send))
    while not client.messages:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (record,) = access_records(access_log)
    assert fields(record)["status"] == 200
    assert fields(record)["outcome"] == "cancelled"


async def test_observe_access_log_off_emits_nothing(access_log: pytest.LogCaptureFixture) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    client = Client()
    await observed(app, access_log=False)(http_scope({}, "/x"), client.receive, client.send)
    assert client.status == 204
    assert access_records(access_log) == []


async def test_observe_passes_other_scope_types_through() -> None:
    calls: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append(scope["type"])

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        pass

    scope: Scope = {"type": "lifespan"}
    await observed(app)(scope, receive, send)
    assert calls == ["lifespan"]
    assert REQUEST_ID_KEY not in scope


def test_generated_request_ids_are_unique_32_hex_digits() -> None:
    from relay.server.observe import new_request_id

    ids = [new_request_id() for _ in range(1000)]
    assert all(GENERATED_ID.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


@pytest.fixture
def only_relay_json_handler() -> Iterator[io.StringIO]:
    """relay's JSON handler, as in `relay serve`; the test calls `_without_pytest_handlers`
    first (pytest adds its handlers to the root logger after the fixtures ran)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("relay.access").level
    root.handlers[:] = []
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    try:
        yield stream
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        logging.getLogger("relay.access").setLevel(access_level)


def _without_pytest_handlers() -> logging.Handler:
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if type(h).__module__ == "relay.server.logs"]
    (handler,) = root.handlers
    return handler


async def _one_logged_request(stream: io.StringIO) -> list[list[tuple[str, Any]]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        exchange = exchange_of(scope)
        exchange.route, exchange.cache, exchange.upstream_status = "/o/", "hit", 200
        exchange.bytes_sent = 2
        await send({"type": "http.response.start", "status": 206, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    headers = [
        (b"host", b"relay.test"),
        (b"x-request-id", b"same-id"),
        (b"range", b"bytes=0-1"),
        (b"user-agent", b"t\x01ua"),
    ]
    scope = http_scope({}, "/o/a", headers=headers, query=b"sig=s3cret")
    scope["raw_path"] = b"/o/a?sig=s3cret"
    client = Client()
    await observed(app)(scope, client.receive, client.send)
    logging.getLogger().handlers[0].flush()
    lines = stream.getvalue().splitlines()
    assert "s3cret" not in stream.getvalue()
    return [json.loads(line, object_pairs_hook=list) for line in lines]


async def test_access_line_written_directly_equals_the_formatted_record(
    only_relay_json_handler: io.StringIO,
) -> None:
    """With relay's JSON handler the only taker the access line skips the LogRecord; it has
    the same fields, values and order as the formatter's line for the record."""
    stream = only_relay_json_handler
    handler = _without_pytest_handlers()
    assert direct_json_handler(logging.getLogger("relay.access"), logging.INFO) is handler
    (direct,) = await _one_logged_request(stream)
    stream.seek(0)
    stream.truncate()
    counted: list[logging.LogRecord] = []

    # A filter on the way: the record path (the filter must see a record).
    def count(record: logging.LogRecord) -> bool:
        counted.append(record)
        return True

    handler.addFilter(count)
    try:
        assert direct_json_handler(logging.getLogger("relay.access"), logging.INFO) is None
        (formatted,) = await _one_logged_request(stream)
    finally:
        handler.filters.clear()
    assert len(counted) == 1
    assert [k for k, _ in direct] == [k for k, _ in formatted]
    timed = ("timestamp", "duration_ms", "message")  # differ from one request to the next
    assert [kv for kv in direct if kv[0] not in timed] == [
        kv for kv in formatted if kv[0] not in timed
    ]
    assert [re.sub(r" [0-9.]+ms ", " ", v) for k, v in direct + formatted if k == "message"] == [
        '10.1.2.3 "GET /o/a" 206 2 ok id=same-id'
    ] * 2
    values = dict(direct)
    assert values["level"] == "INFO"
    assert values["logger"] == "relay.access"
    assert (values["status"], values["cache"], values["range"]) == (206, "hit", "bytes=0-1")
    assert values["user_agent"] == "t\\x01ua"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", values["timestamp"])


def test_direct_access_line_only_when_relay_json_handler_is_the_only_taker(
    only_relay_json_handler: io.StringIO,
) -> None:
    """Another handler, a filter, the text format or a stopped propagation: records as usual."""
    access = logging.getLogger("relay.access")
    root = logging.getLogger()
    handler = _without_pytest_handlers()
    assert direct_json_handler(access, logging.INFO) is handler
    other = logging.NullHandler()
    root.addHandler(other)
    assert direct_json_handler(access, logging.INFO) is None
    root.removeHandler(other)
    access.addFilter(logging.Filter("nothing"))
    assert direct_json_handler(access, logging.INFO) is None
    access.filters.clear()
    handler.setLevel(logging.ERROR)
    assert direct_json_handler(access, logging.INFO) is None
    handler.setLevel(logging.NOTSET)
    access.propagate = False
    try:
        assert direct_json_handler(access, logging.INFO) is None
    finally:
        access.propagate = True
    configure_logging("warning", "text", stream=only_relay_json_handler)
    assert direct_json_handler(access, logging.INFO) is None
    configure_logging("warning", "json", stream=only_relay_json_handler)
    assert direct_json_handler(access, logging.INFO) is root.handlers[0]
