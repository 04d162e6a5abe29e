from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from relay.cache.clock import Clock
from tests.harness import (
    INVARIANTS,
    InvariantViolation,
    RelayThread,
    relay_config,
    take_started_relays,
)
from tests.loopback import LoopbackServer
from tests.origin import Origin

pytest_plugins = ["pytester"]

# The fuzz tier (tests/fuzz). "default" is bounded so the tier takes about a minute on two
# cores, and derandomized: the same examples every run, so a CI failure reproduces locally.
# "long" is for local bug hunting: `pytest tests/fuzz --hypothesis-profile=long` (random
# examples, many more of them; Hypothesis prints the seed of a failure).
_FUZZ = settings(
    deadline=None,  # examples talk to a real relay over loopback; timing varies
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,  # no .hypothesis/ directory in the worktree
)
settings.register_profile("default", _FUZZ, max_examples=1000, derandomize=True)
settings.register_profile("long", _FUZZ, max_examples=20_000, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


# Servers started in this process when a test's setup began (see _check_e2e_marker).
_STARTS_AT_SETUP = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    INVARIANTS.enabled = item.get_closest_marker("leaves_resources") is None
    take_started_relays()  # forget relays of earlier tests (module-scoped ones included)
    item.stash[_STARTS_AT_SETUP] = LoopbackServer.starts


def _check_e2e_marker(item: pytest.Item) -> None:
    """Fail a test that starts a relay or an origin on loopback, or uses one a fixture started,
    without the e2e marker: `-m "not e2e"` must run no server (tests/loopback.py)."""
    if item.get_closest_marker("e2e") is not None:
        return
    started = LoopbackServer.starts > item.stash.get(_STARTS_AT_SETUP, LoopbackServer.starts)
    funcargs: dict[str, object] = getattr(item, "funcargs", {})
    used = sorted(n for n, v in funcargs.items() if isinstance(v, LoopbackServer))
    if started or used:
        how = f"uses {', '.join(used)}" if used else "starts a relay or an origin"
        pytest.fail(
            f"{item.nodeid} {how} over loopback: mark it e2e (pytestmark = pytest.mark.e2e)",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    """After a test that started relays passes, check each one's invariants (a relay still
    running is checked now, one the test stopped was checked by stop()): a relay left
    holding a stream slot, an upstream connection or a task, or having logged an unhandled
    exception, fails the test. A test that started or used a relay or an origin without the
    e2e marker fails too, before it runs if its fixtures did, else after."""
    _check_e2e_marker(item)
    yield  # a test that failed on its own raises here and is reported as it is
    _check_e2e_marker(item)
    if not INVARIANTS.enabled:
        return
    problems: list[str] = []
    for relay in take_started_relays():
        found = relay.invariant_violations() if relay.running else relay.violations_at_stop
        problems.extend(f"relay on port {relay.port}: {v}" for v in found)
    if problems:
        raise InvariantViolation("relay invariants broken:\n  " + "\n  ".join(problems))


@pytest.fixture(scope="session")
def origin() -> Iterator[Origin]:
    with Origin() as server:
        yield server


@pytest.fixture
def make_relay(origin: Origin) -> Iterator[Callable[..., RelayThread]]:
    """Start relays in front of the test origin; all are stopped at teardown."""
    started: list[RelayThread] = []

    def start(*, clock: Clock | None = None, **overrides: Any) -> RelayThread:
        """`clock`: the time the relay's cache reads (see `RelayThread`)."""
        relay = RelayThread(relay_config(origin.url, **overrides), clock=clock).start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        relay.stop()


@pytest.fixture
def relay(make_relay: Callable[..., RelayThread]) -> RelayThread:
    return make_relay()
