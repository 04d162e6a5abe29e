"""Logging setup: one JSON object per line (or a human format), and quiet expected aborts.

JSON lines carry `timestamp` (RFC 3339, UTC), `level`, `logger`, `message`, `exception` when
there is one, and every field passed with `extra=` (the access record's fields, for one; the
startup line's `config`). The format is chosen once: `log_format = "auto"` picks text for a
person at a terminal and JSON for everything else.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import sys
import time
from typing import Any, TextIO

from relay import __version__
from relay.config import Config, settings
from relay.errors import TransferAborted

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FORMATS = ("auto", "json", "text")

logger = logging.getLogger(__name__)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, None, None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}


def rfc3339(created: float) -> str:
    """2025-01-31T12:00:00.123Z"""
    return f"{_utc_seconds(int(created))}.{int(created % 1 * 1000):03d}Z"


@functools.lru_cache(maxsize=4)
def _utc_seconds(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks escaped).

    `worker`: the index of the worker process (workers > 1), the `worker` field of every line.
    """

    def __init__(self, *, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": rfc3339(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.worker is not None:
            out["worker"] = self.worker
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in out:
                out[key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exception"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _encode(out)


class QuietAborts(logging.Filter):
    """uvicorn logs a traceback for every request task that raised; two are expected.

    TransferAborted: relay aborted the client on purpose and has logged why. CancelledError:
    the drain timeout ran out and uvicorn cancelled the download, which aborts it; one line
    says so.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, TransferAborted):
            return False
        if isinstance(exc, asyncio.CancelledError):
            record.msg, record.args, record.exc_info = (
                "in-flight download aborted: drain timeout exceeded",
                (),
                None,
            )
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def direct_json_handler(logger: logging.Logger, level: int) -> _RelayHandler | None:
    """relay's JSON handler when it is the only thing a `level` record of `logger` would meet.

    Then a caller may hand it a line made with `json_line` instead of a LogRecord: the same
    line, without the record's set-up, the handler chain and the formatter's scan of the
    record's attributes (together ~half of an access record's cost). Anything else on the
    way (a filter, another handler such as pytest's, a text format, a propagation stop)
    returns None, and the caller logs a LogRecord as usual.
    """
    found: _RelayHandler | None = None
    current: logging.Logger | None = logger
    while current is not None:
        if current.filters or current.disabled:
            return None
        for handler in current.handlers:
            if (
                found is not None
                or type(handler) is not _RelayHandler
                or handler.filters
                or level < handler.level
                or type(handler.formatter) is not JsonFormatter
            ):
                return None
            found = handler
        if not current.propagate:
            break
        current = current.parent
    return found


def json_line(created: float, level: str, name: str, message: str, fields: dict[str, Any]) -> str:
    """What JsonFormatter makes of a record without exception or stack carrying `fields`
    (none of them a LogRecord attribute) as its `extra=`: the same text, written out
    here (a third of the time of encoding a dict, for the access record's fields)."""
    parts = [
        f'{{"timestamp": "{rfc3339(created)}", "level": {_quote(level)}, '
        f'"logger": {_quote(name)}, "message": {_quote(message)}'
    ]
    for key, value in fields.items():
        if key in _LINE_KEYS:  # the formatter keeps its own for these
            continue
        kind = type(value)
        if kind is str:
            text = _quote(value)
        elif value is None:
            text = "null"
        elif kind is int or (kind is float and math.isfinite(value)):
            text = repr(value)  # as json writes them
        else:
            text = _encode(value)
        parts.append(f"{_quote(key)}: {text}")
    return ", ".join(parts) + "}"


_LINE_KEYS = frozenset({"timestamp", "level", "logger", "message"})
_encode = json.JSONEncoder(default=str).encode
"""json.dumps(obj, default=str), without making an encoder per call."""
_quote = json.encoder.encode_basestring_ascii
"""A str as json.dumps writes it (ensure_ascii, the default)."""


class _RelayHandler(logging.StreamHandler[TextIO]):
    """The handler configure_logging installs (and replaces when called again).

    On an event loop's thread, lines are collected and written once per loop iteration: one
    write (one system call) for all the access records of a busy iteration instead of one
    each, and nothing waits longer than the iteration. Elsewhere, and on `flush()`, they are
    written at once, after any collected ones, so the order is kept.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The loop a write is scheduled on; another loop schedules its own (a loop that
        # stopped before running the callback must not hold later lines back).
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self.worker_field = ""
        """`, "worker": N}` with several workers: ends each line `emit_line` is given."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def emit_line(self, line: str) -> None:
        """Write a line made with `json_line` as `emit` writes a formatted record."""
        if self.worker_field:
            line = line[:-1] + self.worker_field
        with self.lock:  # type: ignore[union-attr]
            try:
                self._queue(line + self.terminator)
            except RecursionError:
                raise
            except Exception:
                self.handleError(logging.makeLogRecord({"msg": line}))

    def _queue(self, line: str) -> None:
        """Collect `line` for the end of this loop iteration (written at once outside a
        loop). The caller holds the handler's lock."""
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write_pending()
            return
        if self._flush_loop is not loop:
            self._flush_loop = loop
            loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_loop = None
            self._write_pending()

    def _write_pending(self) -> None:
        if self._pending:
            text = "".join(self._pending)
            self._pending.clear()
            self.stream.write(text)
        super().flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def close(self) -> None:
        """Replaced by configure_logging, or at exit: lines still collected are written."""
        self.flush()
        super().close()


def chosen_format(fmt: str, stream: TextIO) -> str:
    """The format written to `stream`: `fmt` itself, or for "auto" text when `stream` is a
    terminal (a person reads it) and JSON otherwise (a file, a pipe, a log collector)."""
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except ValueError:  # a closed stream: nobody reads it, as a collector would not
        return "json"


def configure_logging(
    level: str, fmt: str = "auto", *, stream: TextIO | None = None, worker: int | None = None
) -> None:
    """Send every log record to stderr (or `stream`), as JSON lines or as text.

    `worker`: the index of this worker process (workers > 1), added to every record (the
    `worker` field of a JSON line; `worker N` after the level in text).

    Idempotent: calling it again replaces relay's handler, leaving other handlers alone.
    `level` applies to diagnostic logs; access records (logger `relay.access`, INFO) are
    switched on and off by the middleware's `access_log` alone.
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _RelayHandler)]:
        root.removeHandler(old)
        old.close()
    handler = _RelayHandler(stream if stream is not None else sys.stderr)
    json_lines = chosen_format(fmt, handler.stream) == "json"
    text_format = TEXT_FORMAT
    if worker is not None:
        # In the formatter and the handler, not a filter: a filter would turn off the access
        # records' direct path (direct_json_handler).
        handler.worker_field = f', "worker": {int(worker)}}}'
        text_format = TEXT_FORMAT.replace("%(levelname)s ", f"%(levelname)s worker {worker} ")
    formatter = JsonFormatter(worker=worker) if json_lines else logging.Formatter(text_format)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level.upper())
    uvicorn_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, QuietAborts) for f in uvicorn_errors.filters):
        uvicorn_errors.addFilter(QuietAborts())
    logging.getLogger("relay.access").setLevel(logging.INFO)
    # httpx logs every request at INFO: per-request work on the hot path, and noise.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, root.level))


def log_startup(config: Config) -> None:
    """The first line relay logs: the effective configuration as the `config` field (secrets
    masked as in configuration errors: `Config.describe`), and in the message, for a person,
    where it listens, its routes and the settings that differ from their defaults."""
    described = config.describe()
    routes = ", ".join(f"{r['prefix']} -> {r['upstream']}" for r in described["routes"])
    changed = " ".join(
        f"{f.name}={_logfmt(described[f.name])}"
        for f in settings()
        if f.name not in ("host", "port") and getattr(config, f.name) != f.default
    )
    message = f"relay {__version__} starting on {config.host}:{config.port}"
    message += f"; routes: {routes or '(none)'}"
    if changed:
        message += f"; settings: {changed}"
    logger.info(message, extra={"version": __version__, "config": described})


def _logfmt(value: object) -> str:
    """A value as `key=value` text: booleans as in TOML, odd strings quoted."""
    if isinstance(value, bool):
        return str(value).lower()
    text = str(value)
    if isinstance(value, str) and (
        not text or not text.isprintable() or any(c in text for c in ' "=')
    ):
        return _encode(text)
    return text
