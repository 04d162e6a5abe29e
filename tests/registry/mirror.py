"""relay's app with oci routes over a `FakeRegistry`, driven through ASGI with the injected
clock."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from relay import Config, Route, create_app
from relay.cache.clock import ManualClock
from tests.asgi import Client, http_scope, lifespan_state
from tests.registry.fake import FakeRegistry


def oci_route(
    prefix: str = "/dockerhub/", upstream: str = "https://registry.test/", **keys: Any
) -> Route:
    keys.setdefault("redirect_hosts", ("auth.test", "storage.test"))
    return Route(prefix=prefix, upstream=upstream, preset="oci", **keys)


class Mirror:
    """One relay over `registries` (host -> FakeRegistry: the transport dispatches by host)."""

    def __init__(self, config: Config, *registries: FakeRegistry) -> None:
        self.config = config
        self.clock = ManualClock()
        self.registries = {r.host: r for r in registries}
        self.app: Any = None
        self.state: dict[str, Any] = {}

    def _handle(self, request: Any) -> Any:
        host = request.url.host
        registry = self.registries.get(host) or next(
            (r for r in self.registries.values() if r.serves(host)),
            next(iter(self.registries.values())),
        )
        return registry.handle(request)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Mirror]:
        import httpx

        self.app = create_app(
            self.config, transport=httpx.MockTransport(self._handle), clock=self.clock
        )
        async with lifespan_state(self.app) as state:
            self.state = state
            yield self
            cache = state.get("cache")
            if cache is not None:
                await asyncio.gather(*list(cache.tasks), return_exceptions=True)

    async def get(
        self,
        path: str,
        *,
        method: str = "GET",
        query: bytes = b"",
        more: list[tuple[bytes, bytes]] | None = None,
        **headers: str,
    ) -> Client:
        """`headers` as keywords (`_` for `-`); `more`: raw header lines (repeated names)."""
        client = Client()
        raw = [(b"host", b"relay.test")] + [
            (k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()
        ]
        raw += more or []
        await self.app(
            http_scope(self.state, path, method=method, headers=raw, query=query),
            client.receive,
            client.send,
        )
        return client


def cached_config(tmp_path: Path, *routes: Route, **settings: Any) -> Config:
    return Config(
        routes=routes,
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 26,
        cache_verify_on_start=False,
        **settings,
    )


def errors(client: Client) -> list[str]:
    return [e["code"] for e in json.loads(client.body)["errors"]]
