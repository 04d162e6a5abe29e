"""ObserveMiddleware: the request id, the access record, and staying out of the body's way."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from relay.proxy.exchange import exchange_of
from relay.server.metrics import Metrics
from relay.server.observe import REQUEST_ID_KEY, ObserveMiddleware
from relay.types import Message, Receive, Scope, Send
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
