"""A request the cache or the Hub path admitted keeps its one stream slot when it is handed on
(to the relayed response, or from the Hub's metadata request to the cache): it is never refused
halfway. Driven through the app with hand-written receive/send, upstreams on
`httpx.MockTransport`, and a limiter whose every freed slot is taken at once by a waiting
neighbour, as on a busy relay: a response that gave its slot back and took one again would
find none."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.config import Config, Route
from relay.proxy.admission import StreamLimiter
from relay.server.app import create_app
from tests.asgi import Client, http_scope, lifespan_state

BODY = b"relayed bytes " * 100
SHA256 = hashlib.sha256(BODY).hexdigest()


class _Body(httpx.AsyncByteStream):
    """BODY as a stream (a `content=` response is read at once, and relay streams raw)."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield BODY


def _upstream(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if request.url.host == "hub.test" and "/resolve/" in path:
        # The Hub's answer for a file: an LFS file's redirect names its sha256; a regular
        # file's 200 does not (relayed).
        if path.endswith("lfs.bin"):
            headers = {
                "Location": "http://cdn.test/blob",
                "X-Linked-Etag": f'"{SHA256}"',
                "X-Linked-Size": str(len(BODY)),
                "X-Repo-Commit": "0" * 40,
            }
            return httpx.Response(302, headers=headers)
        return httpx.Response(200, headers={"Content-Length": str(len(BODY))}, stream=_Body())
    # /private: not storable, so relayed after its fill says so; the CDN's blob: stored.
    cache_control = "private" if path == "/private" else "max-age=600"
    headers = {"Cache-Control": cache_control, "ETag": '"e"', "Content-Length": str(len(BODY))}
    return httpx.Response(200, headers=headers, stream=_Body())


def _app(tmp_path: Path) -> Any:
    config = Config(
        routes=(
            Route(prefix="/o/", upstream="http://origin.test/"),
            Route(
                prefix="/hf/",
                upstream="http://hub.test/",
                preset="hf",
                redirects="follow",
                redirect_hosts=("cdn.test",),
            ),
        ),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=1 << 20,
        max_streams=1,
    )
    return create_app(config, transport=httpx.MockTransport(_upstream))


class _Neighbour:
    """Waits for a stream slot and takes any that is freed, at once."""

    def __init__(self, limiter: StreamLimiter, monkeypatch: pytest.MonkeyPatch) -> None:
        self.limiter = limiter
        self.holds = False
        release = limiter.release

        def release_then_take(client: str | None = None) -> None:
            release(client)
            if not self.holds and limiter.acquire("neighbour") is None:
                self.holds = True

        monkeypatch.setattr(limiter, "release", release_then_take)


@pytest.mark.parametrize(
    "path",
    [
        "/o/private",  # the cache relays what it may not store
        "/hf/org/model/resolve/main/regular.txt",  # the Hub path relays a regular file
        "/hf/org/model/resolve/main/lfs.bin",  # the Hub path hands on to the cache
    ],
)
async def test_a_request_handed_on_keeps_its_slot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """max_streams = 1, held by this request, and a neighbour waiting for any slot freed:
    the request is answered in full (with a give-back-and-take-again it was a 503 halfway),
    and its slot is freed once, when it is over."""
    app = _app(tmp_path)
    async with lifespan_state(app) as state:
        neighbour = _Neighbour(app.state.limiter, monkeypatch)
        client = Client()
        await app(http_scope(state, path), client.receive, client.send)
        assert client.status == 200, client.body
        assert client.body == BODY
        assert client.completed
        assert neighbour.holds  # the slot, freed once the request was over
        assert app.state.limiter.active == 1
