"""Log output: JSON lines, the text format, and the quiet-abort filter configure_logging adds."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from relay import __version__
from relay.config import Config, Route
from relay.errors import TransferAborted
from relay.server.logs import (
    JsonFormatter,
    QuietAborts,
    configure_logging,
    json_line,
    log_startup,
    rfc3339,
)


def make_record(
    msg: str = "hello %s", args: tuple[object, ...] = ("world",), **extra: object
) -> logging.LogRecord:
    record = logging.LogRecord("relay.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_formatter_writes_one_object_on_one_line() -> None:
    record = make_record(created_note="x")
    record.created = 1700000000.5
    line = JsonFormatter().format(record)
    assert "\n" not in line
    assert json.loads(line) == {
        "timestamp": "2023-11-14T22:13:20.500Z",
        "level": "WARNING",
        "logger": "relay.test",
        "message": "hello world",
        "created_note": "x",
    }


def test_json_formatter_includes_exception_text_escaped() -> None:
    """A traceback stays inside the one line, as the `exception` field."""
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        record = make_record("failed:\n%s", ("two lines",))
        record.exc_info = sys.exc_info()
    line = JsonFormatter().format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed:\ntwo lines"
    assert data["exception"].startswith("Traceback (most recent call last):")
    assert data["exception"].endswith("ValueError: bad\nvalue")


def test_json_formatter_serialises_odd_extra_values() -> None:
    line = JsonFormatter().format(make_record(peer=("10.0.0.1", 80), when=object(), none=None))
    data = json.loads(line)
    assert data["peer"] == ["10.0.0.1", 80]
    assert data["when"].startswith("<object object")
    assert data["none"] is None


def test_json_formatter_extra_cannot_replace_standard_fields() -> None:
    data = json.loads(JsonFormatter().format(make_record(level="forged", logger="forged")))
    assert (data["level"], data["logger"]) == ("WARNING", "relay.test")


@pytest.mark.parametrize(
    ("created", "text"),
    [(0.0, "1970-01-01T00:00:00.000Z"), (1735689599.999, "2024-12-31T23:59:59.999Z")],
)
def test_rfc3339_is_utc_with_milliseconds(created: float, text: str) -> None:
    assert rfc3339(created) == text


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back after each test."""
    root = logging.getLogger()
    names = ("uvicorn.error", "httpx", "relay.access")
    handlers, level = list(root.handlers), root.level
    saved = {
        name: (logging.getLogger(name).level, list(logging.getLogger(name).filters))
        for name in names
    }
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, (lvl, filters) in saved.items():
        logging.getLogger(name).setLevel(lvl)
        logging.getLogger(name).filters[:] = filters


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_json_writes_json_lines() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    logging.getLogger("relay.test").info("started %d", 1)
    logging.getLogger("relay.test").debug("not shown")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert json.loads(lines[0])["message"] == "started 1"


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_text_is_human() -> None:
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)
    logging.getLogger("relay.test").warning("careful")
    assert stream.getvalue().rstrip().endswith(" WARNING relay.test: careful")


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_again_replaces_its_handler_and_filter() -> None:
    """Calling it twice leaves one relay handler and one QuietAborts, and keeps others."""
    other = logging.NullHandler()
    logging.getLogger().addHandler(other)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("info", "json", stream=first)
    configure_logging("warning", "text", stream=second)
    logging.getLogger("relay.test").warning("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1
    assert other in logging.getLogger().handlers
    filters = logging.getLogger("uvicorn.error").filters
    assert sum(isinstance(f, QuietAborts) for f in filters) == 1


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_access_records_do_not_depend_on_log_level() -> None:
    """log_level=warning still shows access records: access_log alone switches them."""
    stream = io.StringIO()
    configure_logging("warning", "json", stream=stream)
    logging.getLogger("relay.access").info("GET /", extra={"status": 200})
    logging.getLogger("httpx").info("HTTP Request: GET ...")
    (line,) = stream.getvalue().splitlines()
    assert json.loads(line)["status"] == 200


@pytest.mark.usefixtures("restore_logging")
def test_configure_logging_keeps_expected_aborts_quiet() -> None:
    """TransferAborted tracebacks are dropped; a cancelled drain is one warning line."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    uvicorn_errors = logging.getLogger("uvicorn.error")
    for exc in (TransferAborted("upstream reset"), asyncio.CancelledError()):
        try:
            raise exc
        except (TransferAborted, asyncio.CancelledError):
            uvicorn_errors.exception("Exception in ASGI application")
    (line,) = stream.getvalue().splitlines()
    data = json.loads(line)
    assert data["level"] == "WARNING"
    assert data["message"] == "in-flight download aborted: drain timeout exceeded"
    assert "exception" not in data


def test_configure_logging_refuses_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure_logging("info", "xml")


class Terminal(io.StringIO):
    """A stream that says it is a terminal (as sys.stderr does when a person runs relay)."""

    def isatty(self) -> bool:
        return True


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize(
    ("fmt", "stream", "json_lines"),
    [
        ("auto", Terminal, False),
        ("auto", io.StringIO, True),
        ("json", Terminal, True),
        ("text", io.StringIO, False),
    ],
)
def test_auto_format_is_text_on_a_terminal_and_json_elsewhere(
    fmt: str, stream: type[io.StringIO], json_lines: bool
) -> None:
    """log_format = "auto" (the default) asks the stream: a person at a terminal reads text,
    a pipe or file (a container's log collector) gets JSON; an explicit format is kept."""
    out = stream()
    configure_logging("info", fmt, stream=out)
    logging.getLogger("relay.test").warning("careful")
    line = out.getvalue().rstrip()
    if json_lines:
        assert json.loads(line)["message"] == "careful"
    else:
        assert line.endswith(" WARNING relay.test: careful")


SECRET_CONFIG = Config(
    routes=(
        Route(
            prefix="/gh/", upstream="https://github.com/", auth_env="GH_TOKEN"
        ).resolve_credential({"GH_TOKEN": "Bearer route-s3cret"}),
    ),
    port=9000,
    read_timeout=60.0,
    signing_key="signing-s3cret",
    admin_token="admin-s3cret",
    downloads_open=False,
)


@pytest.mark.usefixtures("restore_logging")
def test_startup_line_carries_the_configuration_as_json_fields() -> None:
    """The startup line's `config` is a JSON object (not a Python dict in the message), with
    every setting and route, secrets masked as configuration errors mask them."""
    stream = io.StringIO()
    configure_logging("info", "json", stream=stream)
    log_startup(SECRET_CONFIG)
    (line,) = stream.getvalue().splitlines()
    assert "s3cret" not in line
    record = json.loads(line)
    assert record["version"] == __version__
    config = record["config"]
    assert config["port"] == 9000
    assert config["read_timeout"] == 60.0
    assert config["access_log"] is True
    assert config["signing_key"] == config["admin_token"] == "***"
    assert config["client_secret"] == ""  # unset: shown as unset
    assert set(config["routes"][0]) == set(SECRET_CONFIG.routes[0].describe())
    assert config["routes"][0]["redirect_hosts"] == []
    assert config["routes"][0]["credential"] == "***"
    assert config["routes"][0]["upstream"] == "https://github.com/"
    assert set(config) == set(SECRET_CONFIG.describe())


@pytest.mark.usefixtures("restore_logging")
def test_startup_message_says_what_was_configured_for_a_person() -> None:
    """In text, the message alone names the address, the routes and each setting changed
    from its default, secrets masked."""
    stream = io.StringIO()
    configure_logging("info", "text", stream=stream)
    log_startup(SECRET_CONFIG)
    text = stream.getvalue()
    assert "s3cret" not in text
    assert f"relay {__version__} starting on 127.0.0.1:9000" in text
    assert "routes: /gh/ -> https://github.com/" in text
    assert "settings: read_timeout=60.0 signing_key=*** admin_token=***" in text
    assert "log_level" not in text  # defaults are left out


class RecordingStream(io.StringIO):
    """Keeps each write() apart, to count how many there were."""

    def __init__(self, writes: list[str]) -> None:
        super().__init__()
        self.writes = writes

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)


async def test_records_logged_on_an_event_loop_are_written_once_per_iteration() -> None:
    """One write for a burst of records, after the loop iteration, in order; flush() and
    records from outside a loop write at once, after anything pending."""
    writes: list[str] = []
    configure_logging("info", "text", stream=RecordingStream(writes))
    log = logging.getLogger("relay.test.batch")
    log.warning("one")
    log.warning("two")
    assert writes == []  # not yet: the loop has not turned
    await asyncio.sleep(0)
    assert len(writes) == 1
    assert writes[0].index("one") < writes[0].index("two")
    log.warning("three")
    for handler in logging.getLogger().handlers:
        handler.flush()
    assert "three" in writes[-1]
    assert len(writes) == 2


def test_a_loop_that_stopped_before_writing_does_not_hold_later_lines_back() -> None:
    writes: list[str] = []
    configure_logging("info", "text", stream=RecordingStream(writes))
    log = logging.getLogger("relay.test.batch")

    first = asyncio.new_event_loop()
    first.call_soon(first.stop)  # runs before the write the record schedules
    first.call_soon(log.warning, "from a loop that stops at once")
    first.run_forever()
    first.close()  # its scheduled write never ran
    with asyncio.Runner() as runner:

        async def later() -> None:
            log.warning("from the next loop")
            await asyncio.sleep(0)

        runner.run(later())
    text = "".join(writes)
    assert "from a loop that stops at once" in text
    assert text.index("stops at once") < text.index("from the next loop")


async def test_replacing_the_handler_writes_the_lines_it_still_held() -> None:
    writes: list[str] = []
    configure_logging("info", "text", stream=RecordingStream(writes))
    logging.getLogger("relay.test.batch").warning("held until the iteration ends")
    assert writes == []
    configure_logging("info", "text", stream=io.StringIO())  # closes the first handler
    assert "held until the iteration ends" in "".join(writes)


def test_json_line_is_the_formatters_line() -> None:
    """json_line writes the text JsonFormatter makes of the same record: quotes, escapes,
    non-ASCII, None, floats (NaN too), bools, tuples, odd objects and forged standard keys."""
    odd = object()
    fields: dict[str, object] = {
        "quoted": 'q"uo\\te\x01',
        "none": None,
        "float": 1.5,
        "tiny": 1e-7,
        "nan": float("nan"),
        "flag": True,
        "pair": ("x", 1),
        "odd": odd,
        "text": "é\u2028",
        "int": -3,
        "big": 10**30,
        "level": "forged",
        "message": "forged",
    }
    record = make_record('m"sg\n%s', ("x",), **fields)
    record.created = 1700000000.25
    expected = JsonFormatter().format(record)
    line = json_line(record.created, "WARNING", "relay.test", 'm"sg\nx', fields)
    assert line == expected
    assert json.loads(line)["level"] == "WARNING"
