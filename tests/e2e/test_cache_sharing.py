"""What one fill shares between clients, end to end: a real relay under uvicorn in front of the
test origin. A fill is built from its key alone (no client's headers reach the answer every
client gets), its answer reaches every client waiting on it whatever the upstream said
(exactly one upstream request), and a purge covers what is being filled."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from relay.config import Route
from tests.e2e.caching import MakeRelay, caching_relay, settled
from tests.ecosystems import Hub
from tests.harness import RelayThread, relay_config, running_relay
from tests.origin import Origin

ATTACKER = "attacker.example"


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


def _links(origin: Origin) -> list[httpx.Headers]:
    return [httpx.Headers(r.headers) for r in origin.requests if r.path == "/links"]


@pytest.mark.parametrize("through", ["host", "trusted proxy"])
def test_cache_fill_never_carries_a_clients_host(
    origin: Origin, cached: Callable[..., RelayThread], through: str
) -> None:
    """An upstream that builds links from X-Forwarded-Host stores a page every client gets:
    the fill sends no client's host (nor X-Forwarded-For/-Proto, request id, User-Agent), so
    one request with `Host: attacker.example` (or a trusted proxy's X-Forwarded-Host) never
    sends later clients there."""
    if through == "host":
        relay = cached()
        poisoned = {"host": ATTACKER}
    else:
        relay = cached(trusted_proxies="127.0.0.1/32")
        poisoned = {"x-forwarded-host": ATTACKER, "x-forwarded-proto": "https"}
    origin.reset_stats()
    path = f"/o/links?v={through.replace(' ', '-')}"
    first = httpx.get(
        relay.url + path, headers={**poisoned, "user-agent": "evil/1", "x-request-id": "r-1"}
    )
    assert first.status_code == 200
    assert first.headers["cache-status"] == "relay; fwd=miss; stored"
    settled(relay)
    second = httpx.get(relay.url + path)
    assert second.headers["cache-status"].startswith("relay; hit")
    assert ATTACKER not in second.text
    assert ATTACKER not in first.text  # the stored page is the same for everyone
    (fill,) = _links(origin)
    for name in ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-for", "x-request-id"):
        assert name not in fill, name
    assert fill["user-agent"].startswith("relay/")
    assert fill["via"] == "1.1 relay"
    assert fill["accept-encoding"] == "deflate,gzip"  # the key's variant of httpx's default


def test_cache_rewritten_index_page_never_depends_on_the_first_clients_host(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A pypi route's index page is stored as the upstream answered the fill (which names no
    client's host) and rewritten per request on the way out: each client's links point at the
    relay it reached, never at the host the first client claimed."""
    routes = (Route(prefix="/o/", upstream=origin.url + "/", allow_private=True, preset="pypi"),)
    relay = cached(routes=routes)
    origin.reset_stats()
    first = httpx.get(relay.url + "/o/links?v=index", headers={"host": ATTACKER})
    assert first.status_code == 200
    assert f"http://{ATTACKER}/o/gen/1k" in first.text  # its own answer, rewritten for it
    settled(relay)
    second = httpx.get(relay.url + "/o/links?v=index")
    assert second.headers["cache-status"].startswith("relay; hit")
    assert ATTACKER not in second.text
    assert f"{relay.url}/o/gen/1k" in second.text
    (fill,) = _links(origin)
    assert "x-forwarded-host" not in fill


def test_cache_hub_requests_carry_only_credentials_of_the_client(tmp_path: Path) -> None:
    """A Hub file's metadata request is per client, but its answer names the source of the one
    fill every client of that sha256 joins: it carries the client's credentials (where the
    route forwards them) and nothing else of the client; nor does the fill from the CDN."""
    hub = Hub()
    hub.token = "t0ken"
    with hub.hub, hub.cdn:
        routes = (
            Route(
                prefix="/hf/",
                upstream=hub.hub.url + "/",
                allow_private=True,
                preset="hf",
                redirects="follow",
                redirect_hosts=("127.0.0.1",),
                forward_client_auth=True,
            ),
        )
        config = relay_config(
            hub.hub.url,
            routes=routes,
            cache_dir=str(tmp_path / "cache"),
            cache_max_bytes=64 * 1024 * 1024,
        )
        with running_relay(config) as relay:
            answer = httpx.get(
                f"{relay.url}/hf/{Hub.repo}/resolve/main/model.bin",
                headers={
                    "host": ATTACKER,
                    "authorization": "Bearer t0ken",
                    "user-agent": "evil/1",
                    "x-request-id": "r-2",
                },
            )
            assert answer.status_code == 200
            assert answer.content == hub.lfs["model.bin"]
            settled(relay)
    (metadata,) = hub.hub.headers
    (fill,) = hub.cdn.headers
    assert metadata["authorization"] == "Bearer t0ken"
    assert "authorization" not in fill  # another origin: never the client's credential
    for sent in (metadata, fill):
        for name in ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-for", "x-request-id"):
            assert name not in sent, name
        assert sent["user-agent"].startswith("relay/")
