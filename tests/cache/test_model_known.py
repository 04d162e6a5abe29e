"""The shortest step sequences of tests/cache/test_model.py's machine that show each known bug
(shrunk by hand from what Hypothesis found). Each runs with every KNOWN_BUGS switch off and
is a strict xfail while its key is in KNOWN_BUGS: once the bug is fixed it passes, and the lead
removes the key (item 1 is a race between a reader and a publishing thread: shown in most
runs, so not strict)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.cache import test_model
from tests.cache.model_judge import Violation
from tests.cache.model_origin import ObjectSpec
from tests.cache.test_model import CHECKS_KNOWN, KNOWN_BUGS, CacheMachine, known

Step = tuple[str, dict[str, Any]]


def _start(size: int, cache_control: str, kind: str = "plain", **more: Any) -> Step:
    spec = ObjectSpec(0, kind, size, cache_control, **more)
    return ("start", {"specs": [spec]})


def _get(**more: Any) -> Step:
    return ("get", {"index": 0, "ae": None, "host": "relay.test", "leave": None, **more})


def _range(start: int, length: int | None) -> Step:
    return (
        "range_get",
        {"index": 0, "start": start, "length": length, "if_range": None, "leave": None},
    )


def _conditional(**more: Any) -> Step:
    return (
        "conditional",
        {"index": 0, "inm": None, "ims": None, "ranged": False, "method": "GET", **more},
    )


def _mode(mode: str, cut_at: int = 0) -> Step:
    return ("origin_mode", {"index": 0, "mode": mode, "cut_at": cut_at})


REPRODUCTIONS: dict[str, list[Step]] = {
    "item-1": [
        _start(131_172, "public, max-age=0, stale-while-revalidate=10"),
        _get(),
        ("bump", {"index": 0, "size": 65_520, "cc": "max-age=60"}),
        ("burst", {"index": 0, "count": 25}),
    ],
    "item-3": [
        _start(5_000, "no-cache"),
        _get(),
        _mode("liar"),
        ("bump", {"index": 0, "size": 100, "cc": "no-cache"}),
        _get(),
    ],
    "item-3-restrict": [
        _start(5_000, "no-cache"),
        _get(),
        ("restrict", {"index": 0, "directive": "no-store"}),
        _get(),
        _get(),
    ],
    "item-4": [
        _start(5_000, "max-age=60"),
        _get(),
        ("break_meta", {"which": 0, "damage": "stored-at-type"}),
        _get(),
    ],
    "item-4-digest": [
        _start(5_000, "max-age=60", digest=True),
        _get(),
        ("tamper", {"which": 0, "where": 0.5}),
        ("restart", {}),
        _get(),
    ],
    "item-5": [_start(131_172, "max-age=60"), _mode("cut", 20), _get()],
    "item-6": [
        _start(5_000, "no-cache"),
        _get(),
        ("drop_while_asking", {"index": 0, "how": "purge"}),
    ],
    "item-7": [_start(5_000, "max-age=60"), _conditional(inm="current", ranged=True)],
    "item-8": [_start(5_000, "max-age=60", kind="links"), _get(), _get(host="evil.test")],
    "item-9": [_start(5_000, "private, max-age=60"), _range(0, 95), _range(1_000, 95)],
    "item-10": [_start(5_000, "private, max-age=60"), _get()],
    "item-12": [_start(200_000, "max-age=60", chunked=True), _get()],
    "item-13": [_start(200_000, "max-age=60"), _range(0, 95)],
    "item-14": [_start(5_000, "max-age=60"), ("many_keys", {"count": 1000})],
    "item-15": [
        _start(5_000, "max-age=60"),
        _mode("error"),
        ("concurrent", {"requests": [(0, None, None)] * 4}),
    ],
    "item-16": [
        _start(5_000, "max-age=60"),
        ("drop_while_asking", {"index": 0, "how": "purge"}),
        _get(),
    ],
    "item-18": [_start(131_172, "max-age=60"), _mode("cut", 20), _get()],
    "new-unsized-conditional": [
        _start(5_000, "max-age=60", chunked=True),
        _conditional(inm="current"),
    ],
    "new-s-maxage-stale": [
        _start(5_000, "s-maxage=5, stale-if-error=60"),
        _get(),
        ("advance", {"seconds": 6}),
        _mode("error"),
        _get(),
    ],
}


class _OnDisk(CacheMachine):
    """Item 1's window is the publishing thread's fsync and rename: wider on a disk."""

    tmpfs = False


def _reproduction(key: str) -> Any:
    marks = []
    if known(key):
        marks.append(
            pytest.mark.xfail(strict=key != "item-1", raises=AssertionError, reason=KNOWN_BUGS[key])
        )
    return pytest.param(key, id=key, marks=marks)


@pytest.mark.parametrize("key", [_reproduction(key) for key in REPRODUCTIONS])
def test_known_bug_sequence(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sequence that showed a known bug passes every check (it fails until the bug is
    fixed: strict xfail while its key is in KNOWN_BUGS; item 1 is a race, shown most runs)."""
    monkeypatch.setattr(test_model, "_ALL", True)  # no switch hides the steps
    machine = CacheMachine() if key != "item-1" else _OnDisk()
    violate = machine._violate

    def others_reported(check: str, detail: str) -> None:
        """A check another known bug owns (an empty directory a dropped object leaves is
        item 14's) is that bug's to show, with its own sequence: reported, not failed."""
        owner = CHECKS_KNOWN.get(check)
        if owner is not None and owner != key and owner in KNOWN_BUGS:
            machine.known_seen.append(Violation(check, detail))
        else:
            violate(check, detail)

    monkeypatch.setattr(machine, "_violate", others_reported)
    try:
        for name, arguments in REPRODUCTIONS[key]:
            getattr(machine, name)(**arguments)
            machine._raise_violations()
    finally:
        machine.teardown()
