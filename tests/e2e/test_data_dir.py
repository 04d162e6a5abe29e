"""End to end: one relay per data directory, and a job store it cannot use, at start."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from relay.config import Config
from relay.errors import StartupError
from relay.server.run import build_server
from tests.downloads.test_api import file_sha256, marker, partials, post, wait_done, wait_for
from tests.e2e.test_process import RelayProcess, free_port
from tests.harness import relay_config, running_relay
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
GARBAGE = b"this is not an SQLite database, just bytes left by something else\n" * 64


def failed_start(config: Config) -> StartupError:
    """Start relay on a thread of its own and return the StartupError it refused with."""
    server = build_server(config)
    outcome: list[BaseException | None] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))

    def run() -> None:
        try:
            asyncio.run(server.serve(sockets=[sock]))
            outcome.append(None)
        except BaseException as exc:  # SystemExit from uvicorn, or anything unforeseen
            outcome.append(exc)

    thread = threading.Thread(target=run, name="relay-b")
    thread.start()
    thread.join(30)
    sock.close()
    assert not thread.is_alive(), "relay did not give up starting"
    assert outcome
    assert isinstance(outcome[0], SystemExit), outcome
    assert not server.started
    error = server.startup_error
    assert error is not None
    return error


def serve_process(config_file: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    """`python -m relay serve` until it exits (it is expected to refuse to start)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(config_file),
            "--data-dir",
            str(data_dir),
            "--port",
            str(free_port()),
            "--log-format",
            "text",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def one_line_error(stderr: str) -> str:
    """The `relay:` line of a refused start; there is exactly one and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("relay: ")]
    assert len(lines) == 1, stderr
    return lines[0]


# ---- one relay per data_dir ---------------------------------------------------------------------


def test_second_relay_on_a_data_dir_in_use_refuses_to_start(origin: Origin, tmp_path: Path) -> None:
    """B refuses to start while A runs a job on the directory; A's job completes untouched."""
    config = relay_config(origin.url, data_dir=str(tmp_path))
    tag = marker()
    size = 4 * MiB
    gate = f"dd-{tag}"
    origin.close_gate(gate)  # A's job stays running (its body held after 1 MiB) while B tries
    with running_relay(config) as a:
        path = f"/o/gen/{size}?pause_after=1m&gate={gate}&m={tag}"
        job = post(a, path=path, name="shared").json()
        wait_for(a, job["id"], lambda j: j["bytes_done"] > 0)
        try:
            error = failed_start(config)
            assert str(error).startswith(f"data_dir {tmp_path.resolve()} is in use")
            assert f"(pid {os.getpid()})" in str(error)
            assert partials(tmp_path) == [f"{job['id']}.partial"]  # B did not take it over
        finally:
            origin.open_gate(gate)
        done = wait_done(a, job["id"])
        assert done["state"] == "completed", done
        # B sent nothing upstream: A's single request fetched the whole object.
        assert len([r for r in origin.requests if tag in r.target]) == 1
    assert file_sha256(tmp_path / "files" / "shared") == expected_sha256(size)
    assert (tmp_path / "files" / "shared").stat().st_size == size
    # A released the lock when it stopped: a relay starts on the directory again.
    with running_relay(config) as again:
        assert wait_done(again, job["id"])["state"] == "completed"


def test_relay_serve_refuses_a_data_dir_held_by_another_process(
    origin: Origin, tmp_path: Path
) -> None:
    """Two `relay serve` processes on one data_dir: the second exits 1 with one line."""
    data_dir = tmp_path / "data"
    first = RelayProcess(origin, tmp_path, data_dir=str(data_dir), admin_token="admin").start()
    try:
        assert first.proc is not None
        second = serve_process(first.config, data_dir)
        assert second.returncode == 1, second.stderr
        line = one_line_error(second.stderr)
        assert line == (
            f"relay: cannot start: data_dir {data_dir.resolve()} is in use by another relay "
            f"process (pid {first.proc.pid}); give each relay its own data_dir "
            "(is one volume mounted into two pods?)"
        )
        assert first.proc.poll() is None  # the first one keeps running
    finally:
        first.stop()


# ---- a job store relay cannot use ---------------------------------------------------------------


def test_relay_serve_with_a_corrupt_job_store_exits_with_one_line(
    origin: Origin, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    store = data_dir / "jobs.sqlite3"
    store.write_bytes(GARBAGE)
    config_file = RelayProcess(origin, tmp_path, admin_token="admin").config
    done = serve_process(config_file, data_dir)
    assert done.returncode == 1, done.stderr
    line = one_line_error(done.stderr)
    assert line.startswith(f"relay: cannot start: job store {store.resolve()} cannot be read")
    assert "file is not a database" in line
    assert "move it aside" in line
    assert store.read_bytes() == GARBAGE  # left as it was, for the operator


def test_a_corrupt_job_store_releases_the_data_dir(origin: Origin, tmp_path: Path) -> None:
    """The refused start released its lock: once the file is moved aside, relay starts."""
    store = tmp_path / "jobs.sqlite3"
    store.write_bytes(GARBAGE)
    config = relay_config(origin.url, data_dir=str(tmp_path))
    error = failed_start(config)
    assert str(error).startswith(f"job store {store.resolve()} cannot be read")
    store.rename(tmp_path / "jobs.sqlite3.bad")
    with running_relay(config) as relay:
        job = post(relay, path=f"/o/gen/1000?m={marker()}", name="after").json()
        assert wait_done(relay, job["id"])["state"] == "completed"


def test_a_locked_job_store_is_named_at_start(
    origin: Origin, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process holds a write lock on jobs.sqlite3: one line saying so, not a hang."""
    monkeypatch.setattr("relay.downloads.store.BUSY_TIMEOUT", 0.1)
    store = tmp_path / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(store, isolation_level=None)) as holder:
        holder.execute("CREATE TABLE other (x)")
        holder.execute("BEGIN EXCLUSIVE")
        error = failed_start(relay_config(origin.url, data_dir=str(tmp_path)))
        holder.execute("ROLLBACK")
    assert str(error).startswith(f"job store {store.resolve()} is locked (database is locked)")
    assert "another process" in str(error)


def test_a_store_from_a_newer_relay_is_refused_with_one_line(
    origin: Origin, tmp_path: Path
) -> None:
    store = tmp_path / "jobs.sqlite3"
    with contextlib.closing(sqlite3.connect(store)) as db:
        db.execute("PRAGMA user_version=99")
    error = failed_start(dataclasses.replace(relay_config(origin.url), data_dir=str(tmp_path)))
    assert "written by a newer relay (schema 99)" in str(error)
