from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness import RelayThread, relay_config
from tests.origin import Origin

TRANSPORTS = ["aiohttp", "httpcore"]


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    with Origin() as server:
        yield server


@pytest.fixture
def make_relay(origin: Origin) -> Iterator[Callable[..., RelayThread]]:
    """Start relays in front of the test origin; all are stopped at teardown."""
    started: list[RelayThread] = []

    def start(**overrides: Any) -> RelayThread:
        relay = RelayThread(relay_config(origin.url, **overrides)).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture(params=TRANSPORTS)
def transport_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def relay(make_relay: Callable[..., RelayThread], transport_name: str) -> RelayThread:
    return make_relay(transport=transport_name)
