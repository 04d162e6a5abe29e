"""Servers the tests run on loopback: relays and origins.

A test that starts one, or uses one a fixture started, is end-to-end and must carry the `e2e`
marker, so that `-m "not e2e"` runs no server at all. tests/conftest.py checks every test:
each server class subclasses `LoopbackServer` and calls `LoopbackServer.started()` when it
starts listening.
"""

from __future__ import annotations

from typing import ClassVar


class LoopbackServer:
    """A relay or an origin a test serves on loopback (see the module docstring)."""

    starts: ClassVar[int] = 0
    """Servers started in this process so far."""

    @staticmethod
    def started() -> None:
        LoopbackServer.starts += 1
