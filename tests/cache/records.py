"""Malformed cache records: a real record (`relay.cache.store.encode`) with one defect each,
for the store's unit tests and the restart tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

_GONE = object()


def _change(**changes: Any) -> Callable[[bytes], bytes]:
    def damage(record: bytes) -> bytes:
        fields: dict[str, Any] = json.loads(record)
        for name, value in changes.items():
            if value is _GONE:
                del fields[name]
            else:
                fields[name] = value
        return json.dumps(fields).encode()

    return damage


def _replace(text: bytes) -> Callable[[bytes], bytes]:
    return lambda record: text


DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "key-type": _change(key=123),
    "stored-at-type": _change(stored_at="yesterday"),
    "missing-length": _change(length=_GONE),
    "missing-key": _change(key=_GONE),
    "missing-schema": _change(schema=_GONE),
    "schema-unknown": _change(schema=99),
    "unknown-field": _change(colour="blue"),
    "nan-lifetime": _change(lifetime=float("nan")),
    "infinite-age": _change(initial_age=float("inf")),
    "negative-length": _change(length=-1),
    "negative-stored-at": _change(stored_at=-5.0),
    "huge-length": _change(length=10**30),
    "huge-stored-at": _change(stored_at=10**400),
    "bool-length": _change(length=True),
    "status-range": _change(status=1000),
    "headers-not-list": _change(headers={"etag": "x"}),
    "header-not-pair": _change(headers=[["etag"]]),
    "header-newline": _change(headers=[["x-a", "1\r\nx-b: 2"]]),
    "header-not-latin1": _change(headers=[["x-a", "\u20ac"]]),
    "extra-not-strings": _change(extra={"total": 5}),
    "extra-total-not-length": _change(extra={"total": "many"}),
    "sha256-not-hex": _change(sha256="zz"),
    "complete-not-bool": _change(complete="yes"),
    "data-slash": _change(data="../../../etc/passwd"),
    "data-dotdot": _change(data=".."),
    "data-other": _change(data="x.data"),
    "not-json": _replace(b"\x00garbage"),
    "truncated": lambda record: record[: len(record) // 2],
    "empty": _replace(b""),
    "a-list": _replace(b"[]"),
    "deep": _replace(b"[" * 100_000),
}
"""Each damage: a function of a valid record."""
