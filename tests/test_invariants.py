"""The invariant checks run after every test that started a relay cannot be vacuous."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import RelayThread

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def test_invariants_hold_for_a_relay_that_served_a_request(
    make_relay: Callable[..., RelayThread],
) -> None:
    """A relay that finished its work settles clean."""
    import httpx

    relay = make_relay()
    assert httpx.get(relay.url + "/o/gen/1k").status_code == 200
    assert relay.invariant_violations() == []


def test_invariants_catch_a_held_stream_slot(make_relay: Callable[..., RelayThread]) -> None:
    """A stream slot taken and never released is reported."""
    relay = make_relay()
    assert relay.call(relay.limiter.try_acquire)
    violations = relay.invariant_violations(timeout=0.2)
    relay.call(relay.limiter.release)
    assert violations == ["1 stream slot(s) still held"]
    assert relay.invariant_violations() == []


def test_invariants_catch_a_logged_unhandled_exception(
    make_relay: Callable[..., RelayThread],
) -> None:
    """An exception logged on the relay's thread (as uvicorn logs one escaping the app) is
    reported once; the same record from another thread is not the relay's."""
    relay = make_relay()

    def log_exception() -> None:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application\n")

    log_exception()  # the test's thread: not this relay's
    relay.call(log_exception)
    violations = relay.invariant_violations(timeout=0.2)
    assert len(violations) == 1
    assert "Exception in ASGI application" in violations[0]
    assert "ValueError: boom" in violations[0]
    assert relay.invariant_violations() == []


@pytest.mark.parametrize(
    "message",
    [
        "ASGI callable returned without completing response.",
        "ASGI callable returned without starting response.",
    ],
)
def test_invariants_catch_an_app_that_returned_mid_response(
    make_relay: Callable[..., RelayThread], message: str
) -> None:
    """uvicorn's error line for an app that returned without starting or completing its
    response (no traceback: what an unmarked client reset produces) is reported."""
    relay = make_relay()
    relay.call(lambda: logging.getLogger("uvicorn.error").error(message))
    violations = relay.invariant_violations(timeout=0.2)
    assert violations == [f"unhandled exception logged: uvicorn.error: {message}"]
    assert relay.invariant_violations() == []


def test_invariants_catch_a_task_left_running(make_relay: Callable[..., RelayThread]) -> None:
    """A task relay started and left running is reported; uvicorn's own are not."""
    relay = make_relay()
    assert relay.loop is not None
    tasks: list[asyncio.Task[None]] = []

    async def forever() -> None:
        await asyncio.sleep(3600)

    relay.call(lambda: tasks.append(asyncio.ensure_future(forever())))
    violations = relay.invariant_violations(timeout=0.2)
    relay.call(tasks[0].cancel)
    assert len(violations) == 1
    assert "forever" in violations[0]
    assert relay.invariant_violations() == []


_INI = (
    "[pytest]\nmarkers =\n    e2e: over loopback\n    leaves_resources: opt out\n"
    "asyncio_default_fixture_loop_scope = function\n"
)


def test_invariants_fail_a_test_whose_own_assertions_pass(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conftest hook fails a passing test that leaves a slot held, and the
    leaves_resources marker opts a test out."""
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makeini(_INI)
    pytester.makepyfile(
        """
        import pytest

        pytestmark = pytest.mark.e2e

        def leak(make_relay):
            relay = make_relay()
            relay.call(relay.limiter.try_acquire)

        def test_leaks(make_relay):
            leak(make_relay)

        @pytest.mark.leaves_resources
        def test_leaks_on_purpose(make_relay):
            leak(make_relay)

        def test_clean(make_relay):
            make_relay()
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        ["*InvariantViolation: relay invariants broken:*", "*1 stream slot(s) still held*"]
    )
    result.stdout.fnmatch_lines(["FAILED *::test_leaks*"])


def test_invariants_catch_a_future_exception_never_retrieved(
    make_relay: Callable[..., RelayThread],
) -> None:
    """asyncio's report of a failed future nobody awaited counts for the relay whose loop
    it belongs to, whichever thread collects the future."""
    import gc

    relay = make_relay()

    def orphan() -> None:
        future = asyncio.get_running_loop().create_future()
        future.set_exception(ConnectionResetError("lost"))

    relay.call(orphan)
    gc.collect()  # on the test's thread
    violations = relay.invariant_violations(timeout=0.2)
    assert len(violations) == 1
    assert "exception was never retrieved" in violations[0]
    assert "ConnectionResetError: lost" in violations[0]


def test_a_test_that_starts_or_uses_a_relay_or_an_origin_must_be_marked_e2e(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The conftest hook fails an unmarked test that starts a relay or an origin (in its body
    or through a fixture), or uses one an earlier test's fixture started, so `-m "not e2e"`
    runs no server; marked tests and tests without a server pass."""
    pytester.makeconftest("from tests.conftest import *  # noqa: F403\n")
    pytester.makeini(_INI)
    pytester.makepyfile(
        """
        import pytest
        from tests.origin import Origin

        @pytest.mark.e2e
        def test_marked(make_relay):
            make_relay()

        def test_unit():
            pass

        def test_starts_an_origin_in_its_body():
            with Origin():
                pass

        def test_starts_a_relay_through_a_fixture(relay):
            pass

        def test_uses_the_session_origin_started_earlier(origin):
            pass
        """
    )
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=3)
    result.stdout.fnmatch_lines(
        [
            "*::test_starts_an_origin_in_its_body starts a relay or an origin over loopback: *",
            "*::test_starts_a_relay_through_a_fixture uses origin, relay over loopback: *",
            "*::test_uses_the_session_origin_started_earlier uses origin over loopback: mark it*",
        ]
    )
