"""relay fetch: end to end against the fault-injecting test origin, plus unit tests."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from relay.cli import main
from relay.fetch.errors import (
    EXIT_CODES,
    OutputExists,
    TransferFailed,
    UsageError,
    VerifyFailed,
)
from relay.fetch.fetcher import FetchOptions, Reporter, fetch, output_name
from relay.fetch.output import ResumeRecord
from relay.fetch.progress import Progress, format_duration, format_size
from tests.origin import Origin, RequestRecord, body_bytes, expected_sha256, gzip_body

ROOT = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def run(*args: str) -> int:
    return main(["fetch", *args])


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name + "."))


@pytest.fixture
def key() -> str:
    """A unique `key=` so `drop_once` drops once per test on the session-wide origin."""
    return uuid.uuid4().hex


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "file.bin"


def seen(origin: Origin, key: str) -> list[RequestRecord]:
    return [r for r in origin.requests if f"key={key}" in r.target]


# ---- end to end: success ------------------------------------------------------------------------


@pytest.mark.e2e
def test_fetch_complete_download_verified(
    origin: Origin, out: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 32 MiB body lands in FILE byte for byte; only the summary is printed without a TTY."""
    digest = expected_sha256(32 * MiB)
    url = origin.url_for("/gen/32m", key=key)
    assert run(url, "-o", str(out), "--sha256", digest.upper()) == 0
    assert sha256_file(out) == digest
    assert leftovers(out) == []
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.count("\n") == 1
    assert f"saved {out}: 32.0 MiB" in err
    assert digest in err
    (req,) = seen(origin, key)
    assert req.header("accept-encoding") == "identity"
    assert req.header("range") is None
    assert (req.header("user-agent") or "").startswith("relay-fetch/")


@pytest.mark.e2e
def test_fetch_quiet_prints_nothing(
    origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(origin.url_for("/gen/64k"), "-o", str(out), "--quiet") == 0
    assert sha256_file(out) == expected_sha256(64 * 1024)
    assert capsys.readouterr().err == ""


@pytest.mark.e2e
def test_fetch_empty_body(origin: Origin, out: Path) -> None:
    assert run(origin.url_for("/gen/0"), "-o", str(out)) == 0
    assert out.read_bytes() == b""
    assert leftovers(out) == []


@pytest.mark.e2e
def test_fetch_follows_redirects(origin: Origin, out: Path) -> None:
    target = origin.url_for("/gen/1m")
    assert run(origin.url_for("/redirect", to=target, code=302), "-o", str(out)) == 0
    assert sha256_file(out) == expected_sha256(MiB)


@pytest.mark.e2e
def test_fetch_saves_an_encoded_body_as_sent(
    origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """If the server encodes anyway, the bytes are saved as sent, never decompressed."""
    url = origin.url_for("/gen/256k", gzip=1)
    assert run(url, "-o", str(out), "-H", "Accept-Encoding: gzip") == 0
    assert out.read_bytes() == gzip_body(256 * 1024)
    assert "Content-Encoding: gzip" in capsys.readouterr().err


@pytest.mark.e2e
def test_fetch_default_output_name_is_last_path_segment(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert run(origin.url_for("/gen/64k", v=3)) == 0
    assert sha256_file(tmp_path / "64k") == expected_sha256(64 * 1024)


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("http://h/a/b%20c.tar.gz?x=1", "b c.tar.gz"),
        ("http://h/a/%2Fetc%2Fpasswd", "_etc_passwd"),
        ("http://h/a/..%5Cx", ".._x"),
        ("http://h/a/x%00y", "x_y"),
    ],
)
def test_output_name_is_sanitised(url: str, name: str) -> None:
    assert output_name(url) == name


@pytest.mark.parametrize("url", ["http://h/", "http://h", "http://h/a/%2e%2e", "http://h/a/."])
def test_output_name_refuses_urls_without_a_name(url: str) -> None:
    with pytest.raises(UsageError, match="give -o"):
        output_name(url)


@pytest.mark.e2e
def test_fetch_force_replaces_and_refuses_without(
    origin: Origin, out: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --force an existing FILE is left alone (exit 4) and nothing is requested."""
    out.write_bytes(b"keep me")
    url = origin.url_for("/gen/64k", key=key)
    assert run(url, "-o", str(out)) == 4
    assert out.read_bytes() == b"keep me"
    assert seen(origin, key) == []
    assert "exists" in capsys.readouterr().err
    assert run(url, "-o", str(out), "--force") == 0
    assert sha256_file(out) == expected_sha256(64 * 1024)


# ---- end to end: failures -----------------------------------------------------------------------


@pytest.mark.e2e
def test_fetch_sha256_mismatch_exits_6_and_leaves_nothing(
    origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(origin.url_for("/gen/1m"), "-o", str(out), "--sha256", "0" * 64) == 6
    assert not out.exists()
    assert leftovers(out) == []
    assert "sha256 mismatch" in capsys.readouterr().err


@pytest.mark.e2e
def test_fetch_checks_the_sha256_the_server_announces(
    origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Repr-Digest that does not match the body: exit 6, nothing published or kept."""
    assert run(origin.url_for("/gen/64k", repr_digest="good"), "-o", str(out)) == 0
    out.unlink()
    assert run(origin.url_for("/gen/64k", repr_digest="bad"), "-o", str(out)) == 6
    assert "the upstream announced" in capsys.readouterr().err
    assert not out.exists()
    assert leftovers(out) == []


@pytest.mark.e2e
def test_fetch_404_exits_3(origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(origin.url_for("/status/404"), "-o", str(out)) == 3
    assert "404 Not Found" in capsys.readouterr().err
    assert not out.exists()
    assert leftovers(out) == []


@pytest.mark.e2e
def test_fetch_503_is_retried_then_exits_3(origin: Origin, out: Path, key: str) -> None:
    url = origin.url_for("/status/503", key=key)
    assert run(url, "-o", str(out), "--retries", "2", "--retry-delay", "0") == 3
    assert len(seen(origin, key)) == 3
    assert leftovers(out) == []


def test_fetch_connection_refused_exits_5(out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/x"
    assert run(url, "-o", str(out), "--retries", "1", "--retry-delay", "0") == 5
    err = capsys.readouterr().err
    assert "cannot connect" in err
    assert "gave up after 1 retry" in err
    assert leftovers(out) == []


@pytest.mark.e2e
def test_fetch_longer_lying_length_exits_5(origin: Origin, out: Path) -> None:
    """A body shorter than its Content-Length is a failed transfer, retried, never saved."""
    url = origin.url_for("/gen/256k", lie_length=300_000)
    assert run(url, "-o", str(out), "--retries", "1", "--retry-delay", "0") == 5
    assert not out.exists()


@pytest.mark.e2e
def test_fetch_shorter_lying_length_caught_by_checksum(origin: Origin, out: Path) -> None:
    """A Content-Length shorter than the body looks complete: only --sha256 can tell."""
    url = origin.url_for("/gen/256k", lie_length=1000)
    digest = expected_sha256(256 * 1024)
    assert run(url, "-o", str(out), "--sha256", digest) == 6
    assert not out.exists()
    assert leftovers(out) == []


@pytest.mark.e2e
def test_fetch_read_timeout_resumes_then_exits_5_keeping_partial(
    origin: Origin, out: Path, key: str
) -> None:
    url = origin.url_for("/gen/1m", stall_after=100_000, key=key)
    args = ["-o", str(out), "--timeout", "0.3", "--retries", "1", "--retry-delay", "0"]
    assert run(url, *args) == 5
    assert not out.exists()
    part = out.with_name(out.name + ".part")
    assert part.stat().st_size == 200_000  # each request stalls 100 000 bytes in
    assert sha256_file(part) == expected_sha256(MiB, 0, 200_000)
    assert [r.header("range") for r in seen(origin, key)] == [None, "bytes=100000-"]


# ---- resuming -----------------------------------------------------------------------------------


@pytest.mark.e2e
def test_fetch_resumes_within_a_run_after_a_drop(
    origin: Origin, out: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    n = 1_000_000
    url = origin.url_for("/gen/4m", drop_once=n, key=key)
    assert run(url, "-o", str(out), "--retry-delay", "0") == 0
    assert sha256_file(out) == expected_sha256(4 * MiB)
    first, second = seen(origin, key)
    assert first.header("range") is None
    assert second.header("range") == f"bytes={n}-"
    assert second.header("if-range") == f'"gen-{4 * MiB}-v1"'
    assert "retrying" in capsys.readouterr().err


@pytest.mark.e2e
def test_fetch_resumes_across_runs(
    origin: Origin, out: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run 1 dies with --retries 0 (exit 5, partial kept); run 2 continues from its end."""
    n = 1_500_000
    url = origin.url_for("/gen/4m", drop_once=n, key=key)
    assert run(url, "-o", str(out), "--retries", "0") == 5
    assert not out.exists()
    assert leftovers(out) == ["file.bin.part", "file.bin.part.json"]
    meta = json.loads(out.with_name("file.bin.part.json").read_text())
    assert meta == {"url": url, "validator": f'"gen-{4 * MiB}-v1"', "total": 4 * MiB}
    assert "kept in" in capsys.readouterr().err

    assert run(url, "-o", str(out), "--retries", "0") == 0
    assert sha256_file(out) == expected_sha256(4 * MiB)
    assert leftovers(out) == []
    assert [r.header("range") for r in seen(origin, key)] == [None, f"bytes={n}-"]
    assert "resumed at" in capsys.readouterr().err


@pytest.mark.e2e
def test_fetch_restarts_when_the_etag_changed_between_runs(
    origin: Origin, out: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = origin.url_for("/gen/4m", etag_changes=1, drop_once=1_000_000, key=key)
    assert run(url, "-o", str(out), "--retries", "0") == 5
    assert run(url, "-o", str(out), "--retries", "0") == 0
    assert sha256_file(out) == expected_sha256(4 * MiB)
    second = seen(origin, key)[1]
    assert second.header("range") == "bytes=1000000-"
    assert second.header("if-range") is not None
    assert "starting over" in capsys.readouterr().err


@pytest.mark.e2e
def test_fetch_restarts_when_the_etag_changed_during_a_run(
    origin: Origin, out: Path, key: str
) -> None:
    url = origin.url_for("/gen/4m", etag_changes=1, drop_once=2_000_000, key=key)
    assert run(url, "-o", str(out), "--retry-delay", "0") == 0
    assert sha256_file(out) == expected_sha256(4 * MiB)
    assert [r.header("range") for r in seen(origin, key)] == [None, "bytes=2000000-"]


@pytest.mark.e2e
def test_fetch_finishes_a_complete_partial_on_416(origin: Origin, out: Path, key: str) -> None:
    """A partial that already holds every byte is confirmed by a 416 and published."""
    size = 256 * 1024
    url = origin.url_for("/gen/256k", key=key)
    out.with_name("file.bin.part").write_bytes(body_bytes(size))
    record = ResumeRecord(url, f'"gen-{size}-v1"', size)
    out.with_name("file.bin.part.json").write_text(record.dumps())
    assert run(url, "-o", str(out), "--sha256", expected_sha256(size)) == 0
    assert sha256_file(out) == expected_sha256(size)
    assert leftovers(out) == []
    assert [r.header("range") for r in seen(origin, key)] == [f"bytes={size}-"]


@pytest.mark.e2e
def test_fetch_no_resume_discards_the_partial(origin: Origin, out: Path, key: str) -> None:
    url = origin.url_for("/gen/1m", key=key)
    out.with_name("file.bin.part").write_bytes(b"x" * 1000)
    record = ResumeRecord(url, f'"gen-{MiB}-v1"', MiB)
    out.with_name("file.bin.part.json").write_text(record.dumps())
    assert run(url, "-o", str(out), "--no-resume") == 0
    assert sha256_file(out) == expected_sha256(MiB)
    assert [r.header("range") for r in seen(origin, key)] == [None]


@pytest.mark.e2e
def test_fetch_discards_a_partial_from_another_url(
    origin: Origin, out: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = origin.url_for("/gen/1m", key=key)
    out.with_name("file.bin.part").write_bytes(b"x" * 1000)
    other = origin.url_for("/gen/1m", v=2)
    record = ResumeRecord(other, '"gen-1048576-v2"', MiB)
    out.with_name("file.bin.part.json").write_text(record.dumps())
    assert run(url, "-o", str(out)) == 0
    assert sha256_file(out) == expected_sha256(MiB)
    assert [r.header("range") for r in seen(origin, key)] == [None]
    assert "discarding file.bin.part" in capsys.readouterr().err


@pytest.mark.e2e
def test_fetch_refuses_a_partial_in_use(
    origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fcntl = pytest.importorskip("fcntl")
    part = out.with_name("file.bin.part")
    with part.open("wb") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert run(origin.url_for("/gen/1m"), "-o", str(out)) == 1
    assert "in use" in capsys.readouterr().err
    assert part.exists()


# ---- against a mock transport (servers the test origin cannot imitate) ---------------------------


class _DroppingStream(httpx.SyncByteStream):
    def __init__(self, data: bytes, drop_at: int | None) -> None:
        self.data, self.drop_at = data, drop_at

    def __iter__(self) -> Iterator[bytes]:
        if self.drop_at is None:
            yield self.data
            return
        yield self.data[: self.drop_at]
        raise httpx.RemoteProtocolError("peer closed connection")


def _fetch(tmp_path: Path, handler: Callable[[httpx.Request], httpx.Response]) -> tuple[str, str]:
    out = tmp_path / "mock.bin"
    stream = io.StringIO()
    opts = FetchOptions(url="http://mock/x", output=str(out), retry_delay=0)
    digest = fetch(opts, Reporter(stream), transport=httpx.MockTransport(handler))
    return digest, stream.getvalue()


def test_fetch_without_a_validator_restarts_from_zero(tmp_path: Path) -> None:
    """No ETag, no Accept-Ranges: a drop is retried from byte 0, never with Range."""
    data = os.urandom(10_000)
    ranges: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        ranges.append(request.headers.get("range"))
        drop = 4_000 if len(ranges) == 1 else None
        headers = {"Content-Length": str(len(data))}
        return httpx.Response(200, headers=headers, stream=_DroppingStream(data, drop))

    digest, _ = _fetch(tmp_path, handler)
    assert digest == hashlib.sha256(data).hexdigest()
    assert ranges == [None, None]
    assert (tmp_path / "mock.bin").read_bytes() == data


def test_fetch_rejects_a_206_at_the_wrong_offset(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        headers = {"ETag": '"a"', "Accept-Ranges": "bytes", "Content-Length": str(len(data))}
        if len(calls) == 1:
            return httpx.Response(200, headers=headers, stream=_DroppingStream(data, 4_000))
        headers["Content-Range"] = f"bytes 0-9999/{len(data)}"
        return httpx.Response(206, headers=headers, stream=_DroppingStream(data, None))

    with pytest.raises(TransferFailed, match="unusable 206") as info:
        _fetch(tmp_path, handler)
    assert info.value.exit_code == 5
    assert calls[1].headers["range"] == "bytes=4000-"
    assert (tmp_path / "mock.bin.part").stat().st_size == 4_000  # kept for another run


def test_fetch_never_replaces_a_file_that_appeared_while_downloading(tmp_path: Path) -> None:
    """FILE was absent when the run started; created meanwhile, it is not overwritten (exit 4)."""
    out = tmp_path / "mock.bin"

    def handler(request: httpx.Request) -> httpx.Response:
        out.write_bytes(b"theirs")
        body = _DroppingStream(b"abcde", None)
        return httpx.Response(200, headers={"Content-Length": "5"}, stream=body)

    opts = FetchOptions(url="http://mock/x", output=str(out), retry_delay=0)
    with pytest.raises(OutputExists, match="not overwritten") as info:
        fetch(opts, Reporter(io.StringIO()), transport=httpx.MockTransport(handler))
    assert info.value.exit_code == 4
    assert out.read_bytes() == b"theirs"
    assert list(tmp_path.iterdir()) == [out]


def test_fetch_size_mismatch_exits_6(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Length": "100"}, stream=_DroppingStream(b"x" * 50, None)
        )

    with pytest.raises(VerifyFailed, match="size mismatch") as info:
        _fetch(tmp_path, handler)
    assert info.value.exit_code == 6
    assert list(tmp_path.iterdir()) == []


def test_fetch_resumes_with_an_implicitly_strong_last_modified(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    lm, date = "Wed, 01 Jan 2025 00:00:00 GMT", "Thu, 02 Jan 2025 00:00:00 GMT"
    seen_if_range: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen_if_range.append(request.headers.get("if-range"))
        headers = {"Last-Modified": lm, "Date": date, "Accept-Ranges": "bytes"}
        if "range" not in request.headers:
            headers["Content-Length"] = str(len(data))
            return httpx.Response(200, headers=headers, stream=_DroppingStream(data, 3_000))
        headers["Content-Range"] = f"bytes 3000-9999/{len(data)}"
        return httpx.Response(206, headers=headers, stream=_DroppingStream(data[3_000:], None))

    digest, _ = _fetch(tmp_path, handler)
    assert digest == hashlib.sha256(data).hexdigest()
    assert seen_if_range == [None, lm]


# ---- the progress bar ---------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_progress_redraws_at_most_every_interval() -> None:
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(stream, width=80, clock=clock)
    bar.start(1000, 0)
    for done in range(1, 100):
        clock.now += 0.01  # 99 updates over ~1 s
        bar.update(done)
    assert 9 <= stream.getvalue().count("\r") <= 11


def test_progress_shows_percent_rate_and_eta() -> None:
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(stream, width=100, clock=clock)
    bar.start(10 * MiB, 0)
    for i in range(1, 11):
        clock.now += 0.5
        bar.update(i * 512 * 1024)  # steady 1 MiB/s
    line = bar.line()
    assert line.startswith(" 50% [")
    assert "5.0 MiB / 10.0 MiB" in line
    assert "1.0 MiB/s" in line
    assert line.endswith("ETA  0:05")
    assert len(line) <= 99
    assert stream.getvalue().endswith(line)


def test_progress_rate_is_smoothed() -> None:
    clock = FakeClock()
    bar = Progress(io.StringIO(), clock=clock)
    bar.start(None, 0)
    done = 0
    for _ in range(20):
        clock.now += 0.1
        done += 100_000  # 1 MB/s
        bar.update(done)
    clock.now += 0.1
    bar.update(done + 1_000_000)  # one 10x burst
    assert bar.rate is not None
    assert 1_000_000 < bar.rate < 5_000_000


def test_progress_without_total_and_clear() -> None:
    clock, stream = FakeClock(), io.StringIO()
    bar = Progress(stream, width=40, clock=clock)
    bar.start(None, 0)
    clock.now += 1
    bar.update(2 * MiB)
    assert bar.line() == "2.0 MiB  2.0 MiB/s"
    bar.clear()
    assert stream.getvalue().endswith("\r" + " " * len("2.0 MiB  2.0 MiB/s") + "\r")


def test_progress_narrow_terminal_drops_the_bar() -> None:
    bar = Progress(io.StringIO(), width=30, clock=FakeClock())
    bar.start(100, 50)
    assert "[" not in bar.line()
    assert len(bar.line()) <= 29


def test_format_helpers() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(3 * 1024**4) == "3.0 TiB"
    assert format_duration(65) == "1:05"
    assert format_duration(3725) == "1:02:05"


@pytest.mark.e2e
def test_fetch_progress_flag_draws_the_bar(
    origin: Origin, out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(origin.url_for("/gen/1m"), "-o", str(out), "--progress") == 0
    err = capsys.readouterr().err
    assert "\r" in err
    assert "% [" in err
    assert err.rstrip("\n").splitlines()[-1].split("\r")[-1].startswith("relay fetch: saved")


# ---- the command line ---------------------------------------------------------------------------


def test_fetch_help_lists_every_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run("--help")
    assert info.value.code == 0
    text = capsys.readouterr().out
    for code in EXIT_CODES:
        assert f"\n  {int(code):<4} " in text
    import relay.fetch.fetcher

    assert relay.fetch.fetcher.__doc__ is not None
    for code in EXIT_CODES:
        assert f"\n    {int(code):<4} " in relay.fetch.fetcher.__doc__


@pytest.mark.parametrize(
    "args",
    [
        ["ftp://example.com/x"],
        ["http://h/x", "-H", "Range: bytes=0-"],
        ["http://h/x", "-H", "no colon"],
        ["http://h/x", "--sha256", "abc"],
        ["http://h/x", "--retries", "-1"],
        ["http://h/x", "--quiet", "--progress"],
    ],
)
def test_fetch_usage_errors_exit_2(args: list[str]) -> None:
    with pytest.raises(SystemExit) as info:
        run(*args)
    assert info.value.code == 2


def test_fetch_url_without_a_name_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run("http://127.0.0.1:9/") == 2
    assert "give -o FILE" in capsys.readouterr().err


def _python_m_relay(*args: str) -> list[str]:
    return [sys.executable, "-m", "relay", "fetch", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.e2e
def test_fetch_subprocess_to_stdout(origin: Origin) -> None:
    proc = subprocess.run(
        _python_m_relay(origin.url_for("/gen/8m"), "-o", "-"),
        capture_output=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert hashlib.sha256(proc.stdout).hexdigest() == expected_sha256(8 * MiB)
    assert b"saved stdout: 8.0 MiB" in proc.stderr


@pytest.mark.e2e
def test_fetch_subprocess_ctrl_c_keeps_the_partial_then_resumes(
    origin: Origin, out: Path, key: str
) -> None:
    """SIGINT mid-body exits 130 keeping FILE.part; the same command then resumes it."""
    url = origin.url_for("/gen/2m", slow="4m", key=key)
    part = out.with_name("file.bin.part")
    with subprocess.Popen(
        _python_m_relay(url, "-o", str(out)), stderr=subprocess.PIPE, env=_env()
    ) as proc:
        deadline = time.monotonic() + 10
        while not (part.exists() and part.stat().st_size > 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130, err
    assert b"interrupted" in err
    kept = part.stat().st_size
    assert 0 < kept < 2 * MiB
    assert sha256_file(part) == expected_sha256(2 * MiB, 0, kept)

    done = subprocess.run(
        _python_m_relay(url, "-o", str(out)),
        capture_output=True,
        env=_env(),
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert sha256_file(out) == expected_sha256(2 * MiB)
    assert seen(origin, key)[-1].header("range") == f"bytes={kept}-"


@pytest.mark.e2e
def test_fetch_to_stdout_resumes_by_appending(origin: Origin, key: str) -> None:
    """`-o -` keeps what it already wrote and continues with a range after a drop."""
    sink = io.BytesIO()
    opts = FetchOptions(
        url=origin.url_for("/gen/2m", drop_once=700_000, key=key), output="-", retry_delay=0
    )
    digest = fetch(opts, Reporter(io.StringIO(), quiet=True), stdout=sink)
    assert digest == expected_sha256(2 * MiB)
    assert hashlib.sha256(sink.getvalue()).hexdigest() == digest
    assert [r.header("range") for r in seen(origin, key)] == [None, "bytes=700000-"]


def test_fetch_to_stdout_cannot_start_over(tmp_path: Path) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            200, headers={"Content-Length": "100"}, stream=_DroppingStream(b"x" * 100, 40)
        )

    opts = FetchOptions(url="http://mock/x", output="-", retry_delay=0)
    with pytest.raises(TransferFailed, match="cannot start over: 40 bytes"):
        fetch(
            opts,
            Reporter(io.StringIO()),
            stdout=io.BytesIO(),
            transport=httpx.MockTransport(handler),
        )


@pytest.mark.e2e
def test_fetch_mirror_options_ask_the_next_url(origin: Origin, out: Path, key: str) -> None:
    """`--mirror URL --failover any`: a 503 from the first URL goes on to the mirror."""
    first = f"{origin.url}/p/answer=503/gen/4096?key={key}"
    mirror = origin.url_for("/gen/4096", key=key)
    assert (
        run(first, "-o", str(out), "--retries", "0", "--mirror", mirror, "--failover", "any") == 0
    )
    assert sha256_file(out) == expected_sha256(4096)
    assert [r.path for r in seen(origin, key)] == ["/p/answer=503/gen/4096", "/gen/4096"]
    out.unlink()
    # The default policy (not-found) answers the 503.
    assert run(first, "-o", str(out), "--retries", "0", "--mirror", mirror) == 3


def test_fetch_mirror_on_another_origin_gets_no_user_credential(out: Path) -> None:
    """`-H Authorization: ...` is for URL's origin: a `--mirror` elsewhere is asked without it
    (and without Cookie), as a redirect to another origin would be; a mirror on the same
    origin keeps it."""
    body = b"x" * 4096
    seen_headers: dict[str, httpx.Headers] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen_headers[f"{request.url.host}{request.url.path}"] = request.headers
        if request.url.path == "/missing":
            return httpx.Response(404, stream=_DroppingStream(b"", None))
        headers = {"Content-Length": str(len(body))}
        return httpx.Response(200, headers=headers, stream=_DroppingStream(body, None))

    opts = FetchOptions(
        url="http://first.test/missing",
        output=str(out),
        retry_delay=0,
        headers=(("Authorization", "Bearer secret"), ("Cookie", "s=1"), ("X-Kept", "yes")),
        mirrors=("http://first.test/missing", "http://other.test/file"),
    )
    fetch(opts, Reporter(io.StringIO()), transport=httpx.MockTransport(handler))
    assert out.read_bytes() == body
    first, other = seen_headers["first.test/missing"], seen_headers["other.test/file"]
    assert (first["authorization"], first["cookie"]) == ("Bearer secret", "s=1")
    assert "authorization" not in other
    assert "cookie" not in other
    assert other["x-kept"] == "yes"
