"""End to end with relay as its own process (`python -m relay serve`) and curl as the client."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay import __version__
from tests.harness import CURL, curl, wait_until
from tests.loopback import LoopbackServer
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RelayProcess(LoopbackServer):
    def __init__(self, origin: Origin, tmp_path: Path, **settings: object) -> None:
        self.port = free_port()
        lines = [f"{k} = {v!r}".replace("'", '"') for k, v in settings.items()]
        lines += [
            "[[routes]]",
            'prefix = "/o/"',
            f'upstream = "{origin.url}/"',
            "allow_private = true",
        ]
        self.config = tmp_path / "relay.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / "relay.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> RelayProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
        LoopbackServer.started()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay",
                    "serve",
                    "--config",
                    str(self.config),
                    "--port",
                    str(self.port),
                    "--host",
                    "127.0.0.1",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        assert wait_until(self._healthy, timeout=20), self.log.read_text()
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def relay_process(origin: Origin, tmp_path: Path) -> Iterator[RelayProcess]:
    relay = RelayProcess(origin, tmp_path, drain_timeout=2, shutdown_delay=1).start()
    yield relay
    relay.stop()


@needs_curl
def test_curl_download_is_byte_exact(relay_process: RelayProcess) -> None:
    size = 64 * 1024 * 1024
    code, digest, length = curl(f"{relay_process.url}/o/gen/{size}")
    assert (code, length, digest) == (0, size, expected_sha256(size))


@needs_curl
@pytest.mark.parametrize("fault", ["close_after=40000", "chunked_die=40000", "reset_after=40000"])
def test_curl_sees_upstream_death_as_partial_transfer(
    relay_process: RelayProcess, fault: str
) -> None:
    """curl exits 18 (partial file) or 56 (receive failure), never 0 with a short file."""
    # etag_changes: every answer has a new ETag, so relay's transparent resume cannot apply.
    code, _, length = curl(f"{relay_process.url}/o/gen/100000?{fault}&etag_changes=1")
    assert code in (18, 56), code
    assert length <= 40000


@needs_curl
def test_curl_resumes_with_range(relay_process: RelayProcess) -> None:
    size = 1_000_000
    code, digest, _ = curl(f"{relay_process.url}/o/gen/{size}", "-r", "500000-")
    assert code == 0
    assert digest == expected_sha256(size, 500000)


def test_sigterm_drains_then_aborts_and_exits_zero(relay_process: RelayProcess) -> None:
    """SIGTERM: not ready at once, still serving during the delay, drains, aborts the rest."""
    assert relay_process.proc is not None
    base = relay_process.url
    slow = httpx.Client(timeout=30)
    short = httpx.Client(timeout=30)
    try:
        long_stream = slow.send(
            slow.build_request("GET", f"{base}/o/gen/100m?slow=1000000"), stream=True
        )
        short_stream = short.send(
            short.build_request("GET", f"{base}/o/gen/1m?slow=2000000"), stream=True
        )
        assert "\nrelay_ready 1.0\n" in httpx.get(f"{base}/metrics", timeout=5).text
        relay_process.proc.send_signal(signal.SIGTERM)
        ready = wait_until(
            lambda: httpx.get(f"{base}/readyz", timeout=2).status_code == 503, timeout=5
        )
        assert ready, "readyz did not turn 503 after SIGTERM"
        # The gauge the RelayNotReady alert watches says the same.
        assert "\nrelay_ready 0.0\n" in httpx.get(f"{base}/metrics", timeout=5).text
        # Within the shutdown delay, new requests are still served.
        assert httpx.get(f"{base}/o/gen/10", timeout=5).status_code == 200
        # A download that fits in the drain window completes intact.
        short_body = b"".join(short_stream.iter_raw())
        assert len(short_body) == 1024 * 1024
        # One that does not is aborted, not ended cleanly.
        with pytest.raises(httpx.RemoteProtocolError):
            for _ in long_stream.iter_raw():
                pass
        assert relay_process.proc.wait(30) == 0
        long_stream.close()
        short_stream.close()
    finally:
        slow.close()
        short.close()
    log = relay_process.log.read_text()
    assert "shutdown requested" in log
    assert "Traceback" not in log


def test_cli_module_and_console_script_run() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relay", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("relay ")
    code = subprocess.run(
        [sys.executable, "-m", "relay", "serve"], capture_output=True, text=True, check=False
    )
    assert code.returncode == 2
    assert "no routes configured" in code.stderr


def test_startup_line_is_json_with_the_configuration_and_secrets_masked(
    origin: Origin, tmp_path: Path
) -> None:
    """stderr to a file (no terminal): the default log format is JSON, and the startup line
    carries the effective configuration as JSON fields, the signing key masked."""
    relay = RelayProcess(origin, tmp_path, signing_key="signing-s3cret", read_timeout=60.0)
    relay.start()
    try:
        lines = relay.log.read_text().splitlines()
    finally:
        relay.stop()
    assert not any("s3cret" in line for line in lines)
    records = [json.loads(line) for line in lines]  # every line is JSON
    starting = [r for r in records if r["message"].startswith(f"relay {__version__} starting")]
    assert len(starting) == 1, lines
    config = starting[0]["config"]
    assert config["port"] == relay.port
    assert config["read_timeout"] == 60.0
    assert config["signing_key"] == "***"
    assert config["log_format"] == "auto"
    assert [r["prefix"] for r in config["routes"]] == ["/o/"]
