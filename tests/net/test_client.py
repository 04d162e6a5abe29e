"""The shared upstream client: relay's streamed requests go straight to the transport; any other
use of the client keeps httpx's full behaviour (auth, redirects, hooks)."""

from __future__ import annotations

import httpx
import pytest

from relay.net.client import UpstreamClient

TIMEOUT = {"timeout": httpx.Timeout(5.0).as_dict()}


def handler(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/redirect":
        return httpx.Response(302, headers={"location": "/target"})
    if request.url.path == "/fail":
        raise httpx.ConnectError("refused")
    return httpx.Response(
        200,
        headers={"set-cookie": "s=1", "x-auth": request.headers.get("authorization", "")},
        content=b"body of " + request.url.path.encode(),
    )


class CountingTransport(httpx.MockTransport):
    def __init__(self) -> None:
        super().__init__(handler)
        self.requests: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return await super().handle_async_request(request)


async def test_a_streamed_request_goes_to_the_transport_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_for_relay(*args: object, **kwargs: object) -> None:
        raise AssertionError("relay's requests skip httpx's auth and redirect machinery")

    monkeypatch.setattr(UpstreamClient, "_send_handling_auth", not_for_relay)
    transport = CountingTransport()
    async with UpstreamClient(transport=transport) as client:
        request = httpx.Request("GET", "http://up.test/redirect", extensions=TIMEOUT)
        response = await client.send(request, stream=True)
        try:
            assert response.status_code == 302  # not followed: relay decides on redirects
            assert response.request is request
            assert transport.requests == [request]
        finally:
            await response.aclose()
        assert response.is_closed
        assert len(client.cookies) == 0


async def test_transport_errors_carry_the_request() -> None:
    async with UpstreamClient(transport=CountingTransport()) as client:
        request = httpx.Request("GET", "http://up.test/fail", extensions=TIMEOUT)
        with pytest.raises(httpx.ConnectError) as caught:
            await client.send(request, stream=True)
    assert caught.value.request is request


async def test_other_uses_take_httpx_full_path() -> None:
    """Redirects followed, client auth applied, hooks run: nothing is skipped for them."""
    hooked: list[str] = []

    async def hook(request: httpx.Request) -> None:
        hooked.append(str(request.url))

    async with UpstreamClient(
        transport=CountingTransport(), auth=("user", "pass"), event_hooks={"request": [hook]}
    ) as client:
        response = await client.get("http://up.test/redirect", follow_redirects=True)
    assert response.status_code == 200
    assert response.content == b"body of /target"
    assert response.headers["x-auth"].startswith("Basic ")
    assert hooked == ["http://up.test/redirect", "http://up.test/target"]


async def test_a_closed_client_refuses_to_send() -> None:
    client = UpstreamClient(transport=CountingTransport())
    await client.aclose()
    request = httpx.Request("GET", "http://up.test/x", extensions=TIMEOUT)
    with pytest.raises(RuntimeError):
        await client.send(request, stream=True)
