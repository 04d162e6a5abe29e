"""End to end over loopback: what relay refuses before any upstream is contacted."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from relay.config import Route
from tests.harness import RelayThread, raw_http, status_of
from tests.origin import Origin

pytestmark = pytest.mark.e2e

HOSTILE_TARGETS = [
    "/o/../gen/10",
    "/o/gen/../../etc/passwd",
    "/o/%2e%2e/gen/10",
    "/o/%2E%2e/gen/10",
    "/o/..%2Fgen/10",
    "/o/gen%2F10",
    "/o/%252e%252e/gen/10",
    "/o/a\\..\\gen/10",
    "/o/a%5c..%5cgen/10",
    "/o/gen/10%00",
    "/o//evil.example/x",
    "//evil.example/o/x",
    "/o/..;/gen/10",
    "@evil.example/o/x",
    "http://evil.example/o/gen/10",
    "https://127.0.0.1:1/o/gen/10",
    "*",
]


@pytest.mark.parametrize("target", HOSTILE_TARGETS)
def test_hostile_targets_get_400_and_never_reach_upstream(
    make_relay: Callable[..., RelayThread], origin: Origin, target: str
) -> None:
    relay = make_relay()
    marker = uuid.uuid4().hex
    sep = "&" if "?" in target else "?"
    request = f"GET {target}{sep}m={marker} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"
    response = raw_http(relay.port, request.encode("latin-1"))
    assert status_of(response) == 400, response[:200]
    assert not [r for r in origin.requests if marker in r.target]


def test_unconfigured_prefix_is_404(relay: RelayThread) -> None:
    assert httpx.get(f"{relay.url}/other/file").status_code == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_other_methods_get_405_with_allow(relay: RelayThread, method: str) -> None:
    response = httpx.request(method, f"{relay.url}/o/gen/10")
    assert response.status_code == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}


def test_health_is_answered_by_relay_even_with_a_root_route(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(routes=(Route(prefix="/", upstream=origin.url + "/", allow_private=True),))
    marker = uuid.uuid4().hex
    assert httpx.get(f"{relay.url}/healthz?m={marker}").text == "ok\n"
    ready = httpx.get(f"{relay.url}/readyz?m={marker}")
    assert ready.status_code == 200
    assert ready.headers["cache-control"] == "no-store"
    assert not [r for r in origin.requests if marker in r.target]
    # ... and everything else goes to the upstream.
    response = httpx.get(f"{relay.url}/gen/10?m={marker}")
    assert response.status_code == 200
    assert len(response.content) == 10


def test_request_smuggling_content_length_with_transfer_encoding_is_refused(
    relay: RelayThread, origin: Origin
) -> None:
    marker = uuid.uuid4().hex
    smuggled = (
        f"GET /o/gen/10?m={marker} HTTP/1.1\r\nHost: relay\r\n"
        "Content-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n"
        f"0\r\n\r\nGET /o/gen/20?m={marker}2 HTTP/1.1\r\nHost: r\r\n\r\n"
    )
    response = raw_http(relay.port, smuggled.encode())
    assert status_of(response) == 400
    assert response.count(b"HTTP/1.1 ") == 1
    assert not [r for r in origin.requests if marker in r.target]
