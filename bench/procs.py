"""Starting and stopping the servers under test: own process groups, bounded waits, log files."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from bench.procfs import process_tree


def raise_interrupt(signum: int, frame: FrameType | None) -> None:
    """A handler for SIGTERM (and SIGHUP): unwind through every ``finally``, so that the servers
    (each in its own session, so not reached by a signal to the bench's group) are stopped;
    the signal's default would end the bench at once and leave them running."""
    raise KeyboardInterrupt(f"signal {signum}")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_get(port: int, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
    """A plain GET to 127.0.0.1:port; returns (status, body). Raises OSError on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


class ServerError(RuntimeError):
    pass


@dataclass
class Server:
    """A server subprocess in its own session / process group."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tree(self) -> list[int]:
        return process_tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, path: str, timeout: float = 30.0, want_status: int = 200) -> None:
        """Poll GET ``path`` until it answers ``want_status`` (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                status, _ = http_get(self.port, path, timeout=1.0)
                if status == want_status:
                    return
                last = f"status {status}"
            except (OSError, http.client.HTTPException) as e:
                last = repr(e)
            time.sleep(0.1)
        raise ServerError(f"{self.name} not ready on GET {path} after {timeout}s ({last})")

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        # Stray members of the group (e.g. nginx workers) after the leader is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)


def start_server(
    name: str,
    argv: Sequence[str],
    port: int,
    log_dir: Path,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    log_path = log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
        )
    return Server(name=name, proc=proc, port=port, log_path=log_path)
