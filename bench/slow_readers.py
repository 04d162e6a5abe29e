"""N concurrent slow HTTP/1.1 readers (run as a subprocess by the benchmark).

Each client sets a small SO_RCVBUF before connecting, sends one GET, and reads the body with
``sock_recv_into`` paced to ``--rate`` bytes/s, so the proxy has to hold (or, if it does not apply
backpressure, buffer) the rest. Protocol on stdout, one line each:

    STREAMING <n>       every client has received body bytes (or the ramp timed out)
    HOLD_DONE           after --hold seconds of streaming; all sockets are then closed
    RESULT <json>       summary, then the process exits
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urlsplit


@dataclass
class Reader:
    status: int = 0
    body: int = 0
    error: str = ""
    streaming: bool = False


async def read_one(
    r: Reader,
    host: str,
    port: int,
    target: str,
    rate: float,
    rcvbuf: int,
    chunk: int,
    started: asyncio.Event,
    all_started: list[int],
    n: int,
    stop: asyncio.Event,
) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    buf = bytearray(chunk)
    view = memoryview(buf)
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (host, port)), timeout=10)
        req = f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
        await loop.sock_sendall(sock, req.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            got = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout=10)
            if not got:
                raise ConnectionError("closed before headers")
            head += got
            if len(head) > 65536:
                raise ConnectionError("headers too large")
        hdr, _, rest = head.partition(b"\r\n\r\n")
        r.status = int(hdr.split(b" ", 2)[1])
        if r.status != 200:
            raise ConnectionError(f"status {r.status}")
        r.body = len(rest)
        t0 = time.monotonic()
        while not stop.is_set():
            ahead = r.body / rate - (time.monotonic() - t0)
            if ahead > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=ahead)
                continue
            try:
                got_n = await asyncio.wait_for(loop.sock_recv_into(sock, view), timeout=1.0)
            except TimeoutError:
                continue
            if got_n == 0:
                raise ConnectionError("closed by server while streaming")
            r.body += got_n
            if not r.streaming:
                r.streaming = True
                all_started[0] += 1
                if all_started[0] >= n:
                    started.set()
    except (OSError, ValueError, IndexError, TimeoutError) as e:
        r.error = f"{type(e).__name__}: {e}"
        all_started[0] += 0 if r.streaming else 1  # a failed client no longer holds up the ramp
        if all_started[0] >= n:
            started.set()
    finally:
        sock.close()


async def run(url: str, n: int, rate: float, hold: float, ramp: float, rcvbuf: int) -> None:
    u = urlsplit(url)
    host = u.hostname or "127.0.0.1"
    port = u.port or 80
    target = u.path + ("?" + u.query if u.query else "")
    readers = [Reader() for _ in range(n)]
    started = asyncio.Event()
    stop = asyncio.Event()
    count = [0]
    chunk = 16 * 1024
    tasks = [
        asyncio.create_task(
            read_one(r, host, port, target, rate, rcvbuf, chunk, started, count, n, stop)
        )
        for r in readers
    ]
    t0 = time.monotonic()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(started.wait(), timeout=ramp)
    ramp_s = time.monotonic() - t0
    streaming = sum(r.streaming and not r.error for r in readers)
    print(f"STREAMING {streaming}", flush=True)
    t1 = time.monotonic()
    await asyncio.sleep(hold)
    held_s = time.monotonic() - t1
    before = [r.body for r in readers]
    print("HOLD_DONE", flush=True)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=30)
    errors = [r.error for r in readers if r.error]
    result = {
        "n": n,
        "streaming": streaming,
        "ramp_s": round(ramp_s, 2),
        "held_s": round(held_s, 2),
        "errors": len(errors),
        "first_errors": errors[:3],
        "mean_body_bytes": sum(before) / n if n else 0,
        "mean_rate_Bps": sum(before) / n / (ramp_s + held_s) if n else 0,
        "statuses": sorted({r.status for r in readers}),
        "readers_sample": [asdict(r) for r in readers[:2]],
    }
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("-n", type=int, default=100)
    p.add_argument("--rate", type=float, default=2e6, help="bytes/s per reader")
    p.add_argument("--hold", type=float, default=10.0)
    p.add_argument("--ramp", type=float, default=30.0, help="max seconds to get all streaming")
    p.add_argument("--rcvbuf", type=int, default=64 * 1024)
    a = p.parse_args()
    asyncio.run(run(a.url, a.n, a.rate, a.hold, a.ramp, a.rcvbuf))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
