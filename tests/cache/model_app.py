"""The cache model's hands on the app (tests/cache/test_model.py): a client that can leave
mid-body, and what the app holds once it settles (descriptors, files on disk).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from starlette.applications import Starlette

from relay.errors import TransferAborted
from tests.asgi import Message, http_scope
from tests.cache.model_origin import RECORD, parse_record


class Probe:
    """An ASGI client: records messages; leaves after `leave_after` body bytes, either by
    reporting a disconnect on receive (ASGI 2.3) or by raising OSError from send (2.4)."""

    def __init__(self, leave_after: int | None = None, style: str = "disconnect") -> None:
        self.start: Message | None = None
        self.chunks: list[bytes] = []
        self.received = 0
        self.completed = False
        self.left = False
        self._leave_after = leave_after
        self._style = style
        self._gone = asyncio.Event()
        self._asked = False

    async def receive(self) -> Message:
        if not self._asked:
            self._asked = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: Message) -> None:
        if self.left:
            raise OSError("client gone")
        kind = message["type"]
        if kind == "http.response.start":
            assert self.start is None, "two response starts"
            self.start = message
        elif kind == "http.response.body":
            assert not self.completed, "body after the end of the response"
            body = message.get("body", b"")
            if body:
                self.chunks.append(body)
                self.received += len(body)
            if not message.get("more_body", False):
                self.completed = True
            if self._leave_after is not None and self.received >= self._leave_after:
                self.left = True
                self._gone.set()
                if self._style == "raise":
                    raise OSError("client disconnected")
        await asyncio.sleep(0)


async def call(
    app: Starlette,
    state: dict[str, Any],
    method: str,
    path: str,
    headers: list[tuple[str, str]],
    *,
    leave_after: int | None = None,
    style: str = "disconnect",
    query: str = "",
) -> tuple[Probe, str | None, bool]:
    """Run one request through the app: (probe, escaped exception, relay aborted)."""
    probe = Probe(leave_after, style)
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    scope = http_scope(
        state,
        path,
        method=method,
        headers=raw,
        query=query.encode(),
        spec_version="2.4" if style == "raise" else "2.3",
    )
    escaped: str | None = None
    aborted = False
    try:
        await app(scope, probe.receive, probe.send)
    except TransferAborted:
        aborted = True
    except OSError:
        if not probe.left:
            escaped = "OSError"
    except Exception as exc:
        escaped = f"{type(exc).__name__}: {exc}"
    return probe, escaped, aborted


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def disk_use(root: Path) -> tuple[int, list[Path], list[Path]]:
    """(bytes of every file under root, the files, empty directories two or more levels
    below root)."""
    total = 0
    files: list[Path] = []
    empty: list[Path] = []
    for directory, dirnames, filenames in os.walk(root):
        here = Path(directory)
        for name in filenames:
            path = here / name
            try:
                total += path.lstat().st_size
            except FileNotFoundError:
                continue
            files.append(path)
        depth = len(here.relative_to(root).parts)
        if not dirnames and not filenames and depth >= 3:
            empty.append(here)
    return total, files, empty


def data_files(root: Path) -> list[tuple[Path, tuple[int, int, str, int]]]:
    """Files under root that hold body records (whatever the layout), with their first
    record's (pid, version, variant, index)."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with path.open("rb") as f:
                head = f.read(RECORD)
        except OSError:
            continue
        parsed = parse_record(head)
        if parsed is not None:
            out.append((path, parsed))
    return out


def meta_files(root: Path) -> list[Path]:
    """Files under root that are JSON metadata (whatever the layout)."""
    out = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        try:
            with path.open("rb") as f:
                head = f.read(1)
        except OSError:
            continue
        if head == b"{":
            out.append(path)
    return out
