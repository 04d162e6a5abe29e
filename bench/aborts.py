"""Aborted downloads: N clients drop mid-body; afterwards no upstream connection may be in use.

    python -m bench.aborts [--count 500] [--concurrency 20] [--pool 10] [--loop auto]

Runs a relay process (pool of --pool connections) in front of the Python test origin, opens
--count downloads of a 64 MiB body that each close their socket (with RST) after 64 KiB, then
reads relay's own gauges from /metrics and its RSS. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.procfs import process_tree, rss_kib
from bench.procs import free_port, http_get, start_server
from tests.harness import abort_download


def _gauge(port: int, name: str, labels: str) -> float | None:
    status, body = http_get(port, "/metrics", timeout=5)
    if status != 200:
        return None
    prefix = f"{name}{{{labels}}} "
    for line in body.decode().splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix) :])
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aborts", description=__doc__)
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--loop", default="auto", choices=("auto", "uvloop", "asyncio"))
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="relay-aborts-"))
    origin_port, relay_port = free_port(), free_port()
    origin = start_server(
        "origin",
        [sys.executable, "-m", "tests.origin", "--port", str(origin_port)],
        origin_port,
        tmp,
    )
    config = tmp / "relay.toml"
    config.write_text(
        f"max_connections = {args.pool}\npool_timeout = 30\n"
        f'loop = "{args.loop}"\n'
        'log_level = "warning"\naccess_log = false\n'
        f'[[routes]]\nprefix = "/o/"\nupstream = "http://127.0.0.1:{origin_port}/"\n'
        "allow_private = true\n"
    )
    relay = start_server(
        "relay",
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(config),
            "--port",
            str(relay_port),
        ],
        relay_port,
        tmp,
    )
    try:
        origin.wait_ready("/gen/1")
        relay.wait_ready("/healthz")
        http_get(relay_port, "/o/gen/1k")
        rss_before = rss_kib(process_tree(relay.pid))
        started = time.monotonic()
        threads: list[threading.Thread] = []
        for i in range(args.count):
            t = threading.Thread(
                target=abort_download,
                args=(relay_port, f"/o/gen/64m?i={i}", 64 * 1024),
                daemon=True,
            )
            t.start()
            threads.append(t)
            if len(threads) >= args.concurrency:
                threads.pop(0).join(60)
        for t in threads:
            t.join(60)
        elapsed = time.monotonic() - started
        in_use = None
        for _ in range(100):  # bounded: up to 10 s for the last aborts to be noticed
            in_use = _gauge(relay_port, "relay_upstream_connections", 'state="in_use"')
            if in_use == 0:
                break
            time.sleep(0.1)
        idle = _gauge(relay_port, "relay_upstream_connections", 'state="idle"')
        aborts = _gauge(relay_port, "relay_client_aborts_total", 'route="/o/"')
        status, body = http_get(relay_port, "/o/gen/1k")
        rss_after = rss_kib(process_tree(relay.pid))
        title = f"{args.count} aborted downloads ({args.loop} loop)"
        print(f"| {title}, pool {args.pool} | value |")
        print("|---|---|")
        print(f"| time | {elapsed:.1f} s |")
        print(f"| upstream connections in use after | {in_use} |")
        print(f"| upstream connections idle after | {idle} |")
        print(f"| client aborts counted | {aborts} |")
        print(f"| next request | {status}, {len(body)} bytes |")
        print(
            f"| relay RSS before → after | {rss_before / 1024:.1f} → {rss_after / 1024:.1f} MiB |"
        )
        return 0 if in_use == 0 and status == 200 else 1
    finally:
        relay.stop()
        origin.stop()


if __name__ == "__main__":
    sys.exit(main())
