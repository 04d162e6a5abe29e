"""The servers the benchmark runs: test data, nginx origin / proxy, relay, baseline relay."""

from __future__ import annotations

import os
import random
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.procs import Server, ServerError, free_port, http_get, start_server

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path("/dev/shm/relay-bench/data")
SIZES = {"1k": 1024, "256m": 256 * 1024 * 1024, "1g": 1024 * 1024 * 1024}
BLOCK = 1024 * 1024


def ensure_data(names: Sequence[str]) -> None:
    """Create the deterministic test files on tmpfs once (a seeded 1 MiB block, repeated)."""
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    os.chmod(DATA_DIR.parent, 0o755)
    os.chmod(DATA_DIR, 0o755)
    block = random.Random(20240601).randbytes(BLOCK)
    for name in names:
        size = SIZES[name]
        path = DATA_DIR / name
        if path.exists() and path.stat().st_size == size:
            continue
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            left = size
            while left > 0:
                n = min(left, BLOCK)
                f.write(block[:n])
                left -= n
        os.chmod(tmp, 0o644)
        tmp.replace(path)


def nginx_path() -> str | None:
    for cand in (shutil.which("nginx"), "/usr/sbin/nginx"):
        if cand and os.access(cand, os.X_OK):
            return cand
    return None


def _nginx_common(workdir: Path, workers: int = 1) -> str:
    user = "user root root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
master_process on;
worker_processes {workers};
pid {workdir}/nginx.pid;
worker_rlimit_nofile 16384;
events {{ worker_connections 8192; }}
"""


def _nginx_http_common(workdir: Path) -> str:
    return f"""    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type application/octet-stream;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""


def _start_nginx(name: str, conf: str, workdir: Path, port: int, log_dir: Path) -> Server:
    exe = nginx_path()
    if exe is None:
        raise ServerError("nginx not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)
    conf_path = workdir / "nginx.conf"
    conf_path.write_text(conf)
    errlog = log_dir / f"{name}.error.log"
    argv = [exe, "-p", str(workdir), "-c", str(conf_path), "-e", str(errlog)]
    return start_server(name, argv, port, log_dir)


@dataclass
class Origin:
    server: Server
    kind: str  # "nginx" or "tests.origin"

    def path(self, name: str) -> str:
        return f"/{name}" if self.kind == "nginx" else f"/gen/{name}"


def nginx_file_server_conf(workdir: Path, port: int, extra: str = "") -> str:
    """nginx serving DATA_DIR with sendfile on 127.0.0.1:`port`; `extra` goes in its server."""
    return (
        _nginx_common(workdir)
        + f"""http {{
{_nginx_http_common(workdir)}    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {DATA_DIR};
{extra}        location = /healthz {{ return 200 "ok\\n"; }}
    }}
}}
"""
    )


def start_origin(tmp: Path, log_dir: Path, use_nginx: bool) -> Origin:
    port = free_port()
    if use_nginx:
        workdir = tmp / "nginx-origin"
        conf = nginx_file_server_conf(workdir, port)
        server = _start_nginx("origin-nginx", conf, workdir, port, log_dir)
        origin = Origin(server, "nginx")
    else:
        argv = [sys.executable, "-m", "tests.origin", "--host", "127.0.0.1", "--port", str(port)]
        server = start_server("origin-python", argv, port, log_dir, cwd=REPO)
        origin = Origin(server, "tests.origin")
    try:
        server.wait_ready(origin.path("1k"), timeout=30)
    except BaseException:  # also an interrupt (SIGTERM, Ctrl-C) while it starts
        server.stop()
        raise
    return origin


def start_nginx_proxy(origin_port: int, tmp: Path, log_dir: Path, *, workers: int = 1) -> Server:
    """nginx proxying to the origin with `workers` worker processes (`worker_processes`)."""
    port = free_port()
    workdir = tmp / f"nginx-proxy-{workers}"
    conf = (
        _nginx_common(workdir, workers)
        + f"""http {{
{_nginx_http_common(workdir)}    upstream origin {{
        server 127.0.0.1:{origin_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location = /healthz {{ return 200 "ok\\n"; }}
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_buffers 8 64k;
            proxy_buffer_size 64k;
        }}
    }}
}}
"""
    )
    server = _start_nginx(f"nginx-proxy-{workers}", conf, workdir, port, log_dir)
    try:
        server.wait_ready("/healthz", timeout=30)
    except BaseException:  # also an interrupt (SIGTERM, Ctrl-C) while it starts
        server.stop()
        raise
    return server


def relay_available() -> tuple[bool, str]:
    """Whether ``python -m relay serve --help`` works in this checkout."""
    try:
        res = subprocess.run(
            [sys.executable, "-m", "relay", "serve", "--help"],
            cwd=REPO,
            capture_output=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, repr(e)
    if res.returncode != 0:
        err = (res.stderr or res.stdout).decode(errors="replace").strip().splitlines()
        return False, err[-1] if err else f"exit {res.returncode}"
    return True, ""


def _probe(server: Server, path: str, expect_len: int) -> None:
    status, body = http_get(server.port, path, timeout=10)
    if status != 200 or len(body) != expect_len:
        raise ServerError(
            f"{server.name}: GET {path} -> {status}, {len(body)} bytes (want 200, {expect_len})"
        )


RELAY_LOG_POSTURE = (
    "relay runs with `--access-log false`, as nginx runs with `access_log off`: like for like. "
    "What relay's access log costs is measured apart (a relay run with it on)."
)


def relay_log_args(access_log: bool) -> list[str]:
    """relay's logging options in the benches: warnings only, access log as asked."""
    return [] if access_log else ["--access-log", "false"]


def relay_serve_argv(port: int, *options: str) -> list[str]:
    """`python -m relay serve` on 127.0.0.1:`port` with `options`, the one form benches use."""
    return [
        sys.executable,
        "-m",
        "relay",
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *options,
    ]


def start_relay(
    label: str,
    origin: Origin,
    tmp: Path,
    log_dir: Path,
    loop: str | None,
    extra_args: str,
    *,
    access_log: bool = False,
    workers: int = 1,
) -> tuple[Server, str]:
    """Start ``relay serve`` routing /o/ to the origin; returns (server, command line used).

    `workers` > 1 adds ``--workers N`` (a supervisor and N worker processes on one port).

    Tries the TOML config form (``allow_private = true``) first, then ``--route``. The access
    log is off unless asked for, as nginx's is in every bench (``RELAY_LOG_POSTURE``).
    """
    origin_url = f"http://127.0.0.1:{origin.server.port}/"
    cfg = tmp / ("".join(c if c.isalnum() else "_" for c in label) + ".toml")
    cfg.write_text(f'[[routes]]\nprefix = "/o/"\nupstream = "{origin_url}"\nallow_private = true\n')
    opts: list[str] = ["--log-level", "warning", *relay_log_args(access_log)]
    if loop:
        opts += ["--loop", loop]
    if workers > 1:
        opts += ["--workers", str(workers)]
    opts += shlex.split(extra_args)
    forms = [["--config", str(cfg)], ["--route", f"/o/={origin_url}"]]
    errors: list[str] = []
    for form in forms:
        port = free_port()
        argv = relay_serve_argv(port, *form, *opts)
        server = start_server(label, argv, port, log_dir, cwd=REPO)
        try:
            server.wait_ready("/healthz", timeout=30)
            _probe(server, "/o" + origin.path("1k"), SIZES["1k"])
        except (ServerError, OSError) as e:
            errors.append(f"{shlex.join(argv[1:])}: {e}")
            server.stop()
            continue
        return server, shlex.join(["python", *argv[1:]])
    raise ServerError("relay would not start:\n" + "\n".join(errors))


def start_baseline(origin: Origin, log_dir: Path) -> tuple[Server, str]:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "bench.baseline_relay",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--prefix",
        "/o/",
        "--upstream",
        f"http://127.0.0.1:{origin.server.port}/",
    ]
    server = start_server("baseline", argv, port, log_dir, cwd=REPO)
    try:
        server.wait_ready("/healthz", timeout=30)
        _probe(server, "/o" + origin.path("1k"), SIZES["1k"])
    except BaseException:  # also an interrupt (SIGTERM, Ctrl-C) while it starts
        server.stop()
        raise
    return server, shlex.join(["python", *argv[1:]])
