"""Driving relay's ASGI app directly, with hand-written receive/send callables."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

from starlette.applications import Starlette

Message = MutableMapping[str, Any]


@contextlib.asynccontextmanager
async def lifespan_state(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    async with app.router.lifespan_context(app) as state:
        yield dict(state or {})


def http_scope(
    state: dict[str, Any],
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[bytes, bytes]] | None = None,
    query: bytes = b"",
    spec_version: str = "2.3",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "root_path": "",
        "headers": headers or [(b"host", b"relay.test")],
        "client": ("10.1.2.3", 50000),
        "server": ("127.0.0.1", 8000),
        "state": dict(state),
    }


class Client:
    """Records what the app sends; can disconnect (2.3) or make send raise (2.4)."""

    def __init__(self, *, disconnect_after: int | None = None, raise_after: int | None = None):
        self.messages: list[Message] = []
        self.body_chunks = 0
        self._disconnect_after = disconnect_after
        self._raise_after = raise_after
        self._disconnected = asyncio.Event()
        self._request_sent = False

    async def receive(self) -> Message:
        if not self._request_sent:
            self._request_sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._disconnected.wait()
        return {"type": "http.disconnect"}

    def disconnect(self) -> None:
        self._disconnected.set()

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            self.body_chunks += 1
            if self._raise_after is not None and self.body_chunks > self._raise_after:
                raise OSError("client disconnected")
            if self._disconnect_after is not None and self.body_chunks >= self._disconnect_after:
                self.disconnect()
        self.messages.append(message)
        await asyncio.sleep(0)

    @property
    def status(self) -> int:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        status: int = start["status"]
        return status

    @property
    def headers(self) -> dict[bytes, bytes]:
        start = next(m for m in self.messages if m["type"] == "http.response.start")
        return dict(start["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages if m["type"].endswith("body"))

    @property
    def completed(self) -> bool:
        return any(
            m["type"] == "http.response.body" and not m.get("more_body", False)
            for m in self.messages
        )
