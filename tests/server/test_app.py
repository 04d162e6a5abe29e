"""RelayFirst: relayed requests skip the router; relay's own paths and other methods do not."""

from __future__ import annotations

from typing import Any

import pytest
from starlette.routing import Route

from relay.server.app import RelayFirst
from tests.asgi import Message


class Recorder:
    def __init__(self, name: str, calls: list[str]) -> None:
        self.name = name
        self.calls = calls

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls.append(self.name)


async def endpoint(request: Any) -> None:
    raise AssertionError("not called")


OWN = [
    Route("/healthz", endpoint),
    Route("/metrics", endpoint),
    Route("/downloads/{job_id:path}", endpoint),
]


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/o/file.bin", "relay"),
        ("HEAD", "/o/file.bin", "relay"),
        ("GET", "/", "relay"),
        ("GET", "/healthz", "router"),
        ("GET", "/metrics", "router"),
        ("GET", "/downloads/abc", "router"),
        ("GET", "/healthzfoo", "router"),  # the router's catch-all relays it, as before
        ("POST", "/o/file.bin", "router"),  # 405 with Allow comes from the router
        ("OPTIONS", "/o/file.bin", "router"),
    ],
)
async def test_dispatch(method: str, path: str, expected: str) -> None:
    calls: list[str] = []
    relay: Any = Recorder("relay", calls)
    app = RelayFirst(Recorder("router", calls), relay=relay, own_routes=list(OWN))

    async def receive() -> Message:
        return {"type": "http.request"}

    async def send(message: Message) -> None:
        pass

    await app({"type": "http", "method": method, "path": path}, receive, send)
    assert calls == [expected]
