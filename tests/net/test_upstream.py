"""Upstream failures map to 502/503/504 in one place, with short bodies (respx)."""

from __future__ import annotations

import httpx
import pytest
import respx

from relay import Config, Route, create_app
from relay.errors import PoolExhausted, UpstreamTimeout, UpstreamUnavailable
from relay.net.upstream import map_upstream_errors
from tests.asgi import Client, http_scope, lifespan_state

ROUTES = (Route(prefix="/o/", upstream="http://upstream.test/base/"),)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (httpx.ConnectError("connection refused"), 502),
        (httpx.RemoteProtocolError("server disconnected"), 502),
        (httpx.ReadError("reset"), 502),
        (httpx.ConnectTimeout("connect timed out"), 504),
        (httpx.ReadTimeout("read timed out"), 504),
        (httpx.PoolTimeout("pool"), 503),
    ],
)
async def test_upstream_errors_become_gateway_statuses(error: Exception, status: int) -> None:
    with respx.mock(assert_all_called=True) as mock:
        mock.get("http://upstream.test/base/file.bin").mock(side_effect=error)
        app = create_app(Config(routes=ROUTES), transport=httpx.AsyncHTTPTransport())
        client = Client()
        async with lifespan_state(app) as state:
            await app(http_scope(state, "/o/file.bin"), client.receive, client.send)
    assert client.status == status
    assert client.completed
    assert client.headers[b"content-type"].startswith(b"text/plain")
    assert client.body.startswith(str(status).encode())
    assert b"Traceback" not in client.body
    if status == 503:
        assert client.headers[b"retry-after"] == b"1"


def test_mapping_keeps_the_cause() -> None:
    cause = httpx.ConnectError("refused")
    with pytest.raises(UpstreamUnavailable) as info, map_upstream_errors():
        raise cause
    assert info.value.__cause__ is cause
    with pytest.raises(UpstreamTimeout), map_upstream_errors():
        raise httpx.ReadTimeout("slow")
    with pytest.raises(PoolExhausted), map_upstream_errors():
        raise httpx.PoolTimeout("busy")


async def test_upstream_url_and_headers_built_from_raw_path() -> None:
    with respx.mock(assert_all_called=True) as mock:
        route = mock.get("http://upstream.test/base/a%20b/c.tar.gz?x=1%2F2").mock(
            return_value=httpx.Response(200, content=b"ok")
        )
        app = create_app(Config(routes=ROUTES), transport=httpx.AsyncHTTPTransport())
        client = Client()
        async with lifespan_state(app) as state:
            scope = http_scope(
                state,
                "/o/a%20b/c.tar.gz",
                query=b"x=1%2F2",
                headers=[
                    (b"host", b"relay.test"),
                    (b"range", b"bytes=0-1"),
                    (b"cookie", b"a=1"),
                ],
            )
            await app(scope, client.receive, client.send)
    assert client.status == 200
    sent = route.calls.last.request
    assert sent.headers["range"] == "bytes=0-1"
    assert sent.headers["accept-encoding"] == "identity"
    assert sent.headers["x-forwarded-for"] == "10.1.2.3"
    assert sent.headers["x-forwarded-host"] == "relay.test"
    assert "cookie" not in sent.headers
    assert sent.headers["host"] == "upstream.test"


async def test_no_route_gives_404_without_contacting_upstream() -> None:
    with respx.mock(assert_all_mocked=True) as mock:
        app = create_app(Config(routes=ROUTES), transport=httpx.AsyncHTTPTransport())
        client = Client()
        async with lifespan_state(app) as state:
            await app(http_scope(state, "/elsewhere/x"), client.receive, client.send)
        assert not mock.calls
    assert client.status == 404


async def test_upstream_cookies_are_never_stored_on_the_shared_client() -> None:
    with respx.mock() as mock:
        mock.get("http://upstream.test/base/a").mock(
            return_value=httpx.Response(200, headers={"Set-Cookie": "s=secret; Path=/"})
        )
        route_b = mock.get("http://upstream.test/base/b").mock(return_value=httpx.Response(200))
        app = create_app(Config(routes=ROUTES), transport=httpx.AsyncHTTPTransport())
        async with lifespan_state(app) as state:
            for path in ("/o/a", "/o/b"):
                client = Client()
                await app(http_scope(state, path), client.receive, client.send)
                assert b"set-cookie" not in client.headers
    assert "cookie" not in route_b.calls.last.request.headers
    assert len(state["upstream"]._client.cookies.jar) == 0
