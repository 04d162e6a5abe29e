"""``python -m bench --oci [--quick]`` (or ``python -m bench.oci``): image pulls through relay's
``preset = "oci"`` beside CNCF distribution (Debian's ``docker-registry``) in proxy mode.

One upstream for both sides: a ``docker-registry`` holding an image written offline
(``tests.oci_image``: one linux/amd64 manifest, a 1 MiB gzip layer and an uncompressed layer of
``--layer-mib`` MiB, 512 by default), behind the fault proxy (``tests.oci_fault_proxy``) that
paces every response body at ``--rate`` MB/s (per response: a rate-limited upstream such as a
CDN edge; per response, so a side that fetches a blob several times is not slowed by it, only
billed) and counts every byte and request. Each side gets a fresh fault proxy and an empty
cache:

* ``relay``: ``python -m relay serve`` with one ``preset = "oci"`` route and ``--cache-dir``;
* ``registry-proxy``: ``docker-registry serve`` with ``proxy: remoteurl:`` (filesystem storage).

Clients: ``--clients`` (16) threads pulling as container clients do (the manifest by tag with
the registry Accept header, then the config and every layer by digest), with Python's
``http.client``, each body hashed and checked against its digest. A plain client rather than
16 skopeo processes: skopeo would write 16 copies of the image to disk and spend the machine's
two cores on it, and what is measured is the registry side. The sides run one after another.

Figures per side: upstream body bytes during the cold pulls over the image size (target for
relay: at most 1.1x), upstream GETs of the big layer, the latest client's time to first byte of
the big layer (from its GET to the first body byte; target for relay < 0.1 s), the cold pulls'
wall time, then warm throughput: one client pulling the whole image (median of ``--runs``), and
``--clients`` clients at once (aggregate). Everything listens on 127.0.0.1; every loop is
bounded; every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import http.client
import json
import shlex
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from bench.procs import Server, free_port, raise_interrupt, start_server
from bench.report import machine_info
from bench.servers import REPO, relay_log_args, relay_serve_argv
from tests.oci_fault_proxy import FaultProxy
from tests.oci_image import MANIFEST, Image, LayerSpec, OciLayout, Platform
from tests.oci_upstream import Registry, push_layout

MIB = 1024 * 1024
SIDES = ("relay", "registry-proxy")
LABELS = {"relay": 'relay preset = "oci"', "registry-proxy": "docker-registry proxy mode"}
NAME = "bench/image"
TAG = "v1"
PREFIX = "up"
"""relay's route prefix: clients pull `<relay>/up/bench/image` (registries.conf style)."""
ACCEPT = ", ".join(
    [
        MANIFEST,
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
)
READ = 1 << 20
TARGET_BYTES = 1.1
TARGET_TTFB = 0.1


@dataclasses.dataclass
class Pull:
    ok: bool = False
    error: str = ""
    layer_ttfb: float = 0.0
    seconds: float = 0.0
    nbytes: int = 0


@dataclasses.dataclass
class Side:
    key: str
    command: str = ""
    error: str | None = None
    upstream_bytes: int = 0
    upstream_requests: int = 0
    layer_gets: int = 0
    cold: list[Pull] = dataclasses.field(default_factory=list)
    cold_seconds: float = 0.0
    warm_one: list[float] = dataclasses.field(default_factory=list)
    """MB/s of single-client warm pulls."""
    warm_many: float | None = None
    """Aggregate MB/s of the concurrent warm pulls."""
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def label(self) -> str:
        return LABELS[self.key]


def _get(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str]
) -> http.client.HTTPResponse:
    conn.request("GET", path, headers=headers)
    return conn.getresponse()


def pull(port: int, base: str, image: Image, *, verify: bool, timeout: float = 600) -> Pull:
    """Pull `image` as a client does: manifest by tag, then config and layers by digest."""
    result = Pull()
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        response = _get(conn, f"{base}/manifests/{TAG}", {"Accept": ACCEPT})
        body = response.read()
        if response.status != 200:
            result.error = f"manifest: {response.status} {body[:200]!r}"
            return result
        manifest = json.loads(body)
        if verify and "sha256:" + hashlib.sha256(body).hexdigest() != image.top.digest:
            result.error = "manifest digest differs"
            return result
        result.nbytes += len(body)
        biggest = max(manifest["layers"], key=lambda d: d["size"])
        for desc in [manifest["config"], *manifest["layers"]]:
            sent = time.perf_counter()
            response = _get(conn, f"{base}/blobs/{desc['digest']}", {})
            if response.status != 200:
                result.error = f"blob {desc['digest'][:19]}: {response.status} {response.read()!r}"
                return result
            sha = hashlib.sha256()
            got = 0
            while got < desc["size"]:
                chunk = response.read1(READ)
                if not chunk:
                    break
                if got == 0 and desc is biggest:
                    result.layer_ttfb = time.perf_counter() - sent
                got += len(chunk)
                if verify:
                    sha.update(chunk)
            got += len(response.read())  # the end of the message (nothing, if all is well)
            result.nbytes += got
            if got != desc["size"] or (verify and "sha256:" + sha.hexdigest() != desc["digest"]):
                result.error = f"blob {desc['digest'][:19]}: {got} bytes, digest differs"
                return result
        result.ok = True
        return result
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        result.error = repr(exc)
        return result
    finally:
        result.seconds = time.perf_counter() - started
        conn.close()


def concurrent_pulls(
    n: int, port: int, base: str, image: Image, *, verify: bool
) -> tuple[list[Pull], float]:
    """`n` pulls started together (a barrier); their results and the wall time."""
    results: list[Pull] = [Pull(error="did not run") for _ in range(n)]
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait(30)
        results[i] = pull(port, base, image, verify=verify)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait(30)
    started = time.perf_counter()
    for t in threads:
        t.join(900)
    return results, time.perf_counter() - started


def start_relay_side(upstream: str, tmp: Path, log_dir: Path) -> tuple[Server, str, str]:
    cfg = tmp / "relay-oci.toml"
    cfg.write_text(
        "[[routes]]\n"
        f'prefix = "/{PREFIX}/"\n'
        f'upstream = "{upstream}/"\n'
        'preset = "oci"\n'
        "allow_private = true\n"
    )
    port = free_port()
    argv = relay_serve_argv(
        port,
        "--config",
        str(cfg),
        "--log-level",
        "warning",
        *relay_log_args(False),
        "--cache-dir",
        str(tmp / "relay-cache"),
        "--cache-max-bytes",
        str(16 * 1024 * MIB),
    )
    server = start_server("relay-oci", argv, port, log_dir, cwd=REPO)
    try:
        server.wait_ready("/healthz", timeout=30)
    except BaseException:
        server.stop()
        raise
    return server, shlex.join(["python", *argv[1:]]), f"/v2/{PREFIX}/{NAME}"


def upstream_first_byte(origin: Registry, image: Image, rate: float) -> float:
    """The upstream's own time to the big layer's first byte (a fresh paced fault proxy, one
    GET, closed after the first bytes): what no side can beat."""
    big = max(image.layers["amd64"], key=lambda b: b.size)
    with FaultProxy(origin.url) as proxy:
        proxy.rate = int(rate * 1_000_000)
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=60)
        try:
            started = time.perf_counter()
            conn.request("GET", f"/v2/{NAME}/blobs/{big.digest}")
            conn.getresponse().read1(READ)
            return time.perf_counter() - started
        finally:
            conn.close()


def run_side(side: Side, image: Image, origin: Registry, tmp: Path, a: argparse.Namespace) -> None:
    log_dir = tmp / "logs"
    with contextlib.ExitStack() as stops:
        proxy = FaultProxy(origin.url).start()
        stops.callback(proxy.stop)
        proxy.rate = int(a.rate * 1_000_000)
        if side.key == "relay":
            server, side.command, base = start_relay_side(proxy.url, tmp, log_dir)
            stops.callback(server.stop)
            port = server.port
        else:
            registry = Registry(tmp / "registry-proxy", proxy_remote=proxy.url).start()
            stops.callback(registry.stop)
            side.command = f"docker-registry serve {registry.workdir / 'config.yml'}"
            port, base = registry.port, f"/v2/{NAME}"
        proxy.reset()
        print(f"   cold: {a.clients} clients", flush=True)
        side.cold, side.cold_seconds = concurrent_pulls(a.clients, port, base, image, verify=True)
        # A fill may still be reading from the upstream after its clients finished.
        last = -1
        for _ in range(100):
            if proxy.body_bytes == last:
                break
            last = proxy.body_bytes
            time.sleep(0.2)
        side.upstream_bytes = proxy.body_bytes
        side.upstream_requests = len(proxy.records)
        big = max(image.layers["amd64"], key=lambda b: b.size)
        side.layer_gets = proxy.count("GET", big.digest)
        bad = [p.error for p in side.cold if not p.ok]
        if bad:
            side.error = f"{len(bad)} cold pulls failed: {bad[0]}"
            return
        print(f"   warm: {a.runs} single pulls, then {a.clients} at once", flush=True)
        for _ in range(a.runs):
            result = pull(port, base, image, verify=False)
            if not result.ok:
                side.error = f"warm pull failed: {result.error}"
                return
            side.warm_one.append(result.nbytes / result.seconds / 1e6)
        results, seconds = concurrent_pulls(a.clients, port, base, image, verify=False)
        if not all(p.ok for p in results):
            side.error = f"concurrent warm pulls failed: {[p.error for p in results if p.error]}"
            return
        side.warm_many = sum(p.nbytes for p in results) / seconds / 1e6
        if proxy.body_bytes != side.upstream_bytes:
            side.notes.append(
                f"upstream bytes during the warm pulls: {proxy.body_bytes - side.upstream_bytes}"
            )


def _f(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def render(
    sides: Sequence[Side],
    image: Image,
    argv: Sequence[str],
    a: argparse.Namespace,
    upstream_ttfb: float | None,
) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    size = image.size
    layer_sizes = ", ".join(str(b.size) for b in image.layers["amd64"])
    lines = [
        f"# relay OCI image-pull benchmark ({now})",
        "",
        f"`{shlex.join(['python', '-m', 'bench', '--oci', *argv])}`",
        "",
        *machine_info(),
        f"- registry: {shutil.which('docker-registry') or 'not installed'} (distribution 2.8)",
        "",
        f"Image: one linux/amd64 manifest, layers {layer_sizes}"
        f" bytes, {size / MIB:.1f} MiB in all (manifest and config included). Upstream: "
        f"docker-registry behind the fault proxy pacing each response at {a.rate:g} MB/s. "
        f"{a.clients} cold clients started together, then warm pulls. The upstream's own first "
        f"byte of the big layer (one GET to a fresh fault proxy): {_f(upstream_ttfb, '.3f')} s. "
        "The cold clients hash every body (as container clients do) on the same two cores as "
        "the servers: the cold wall time is bounded by that, not by the upstream's pace.",
        "",
        "| side | upstream bytes / image | big-layer GETs upstream | latest first layer byte (s)"
        " | cold wall (s) | warm 1 client (MB/s) | warm "
        f"{a.clients} clients (MB/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for side in sides:
        ttfb = max((p.layer_ttfb for p in side.cold if p.ok), default=None)
        warm = statistics.median(side.warm_one) if side.warm_one else None
        lines.append(
            f"| {side.label} | {side.upstream_bytes / size:.2f}x | {side.layer_gets} | "
            f"{_f(ttfb, '.3f')} | {side.cold_seconds:.1f} | {_f(warm, '.0f')} | "
            f"{_f(side.warm_many, '.0f')} |"
        )
    by = {s.key: s for s in sides}
    lines += ["", "## Targets (relay)", ""]
    relay = by.get("relay")
    if relay is not None and relay.error is None and relay.cold:
        ratio = relay.upstream_bytes / size
        ttfb = max(p.layer_ttfb for p in relay.cold)
        lines.append(
            f"- upstream bytes ≤ {TARGET_BYTES}x the image: {ratio:.2f}x "
            f"({'met' if ratio <= TARGET_BYTES else 'NOT met'})"
        )
        lines.append(
            f"- latest client's first layer byte < {TARGET_TTFB} s: {ttfb:.3f} s "
            f"({'met' if ttfb < TARGET_TTFB else 'NOT met'})"
        )
        proxy = by.get("registry-proxy")
        if proxy is not None and proxy.warm_one and relay.warm_one:
            one = statistics.median(relay.warm_one) / statistics.median(proxy.warm_one)
            many = (relay.warm_many or 0) / (proxy.warm_many or 1)
            lines.append(
                f"- warm pull throughput vs the proxy registry: {one:.2f}x (one client), "
                f"{many:.2f}x ({a.clients} clients)"
            )
    else:
        lines.append("- relay did not run to the end: no figures")
    lines += ["", "## Details", ""]
    for side in sides:
        lines.append(f"- **{side.label}**: `{side.command or 'not started'}`")
        if side.error:
            lines.append(f"  - FAILED: {side.error}")
        lines.append(
            f"  - upstream: {side.upstream_bytes} body bytes, {side.upstream_requests} requests"
        )
        ttfbs = ", ".join(f"{t:.3f}" for t in sorted(p.layer_ttfb for p in side.cold))
        lines.append(f"  - cold first layer bytes (s): {ttfbs}")
        if side.warm_one:
            runs = ", ".join(f"{v:.0f}" for v in side.warm_one)
            lines.append(f"  - warm single pulls (MB/s): {runs}")
        lines.extend(f"  - {note}" for note in side.notes)
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench --oci",
        description="image pulls through relay beside docker-registry in proxy mode",
    )
    p.add_argument("--quick", action="store_true", help="fewer warm runs (the same image)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--layer-mib", type=int, default=512)
    p.add_argument("--rate", type=float, default=200.0, help="upstream MB/s per response")
    p.add_argument("--runs", type=int, default=None, help="single warm pulls per side")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    p.add_argument("--output", type=Path, default=REPO / "bench" / "results-oci.md")
    a = p.parse_args(argv)
    if a.runs is None:
        a.runs = 2 if a.quick else 5
    a.clients = max(1, min(64, a.clients))
    return a


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(args)
    missing = [t for t in ("docker-registry", "skopeo") if shutil.which(t) is None]
    if missing:
        print(f"needs {', '.join(missing)} (apt-get install docker-registry skopeo)")
        return 2
    sides = [Side(k) for k in a.sides]
    upstream_ttfb: float | None = None
    image: Image | None = None
    old_term = signal.signal(signal.SIGTERM, raise_interrupt)
    old_hup = signal.signal(signal.SIGHUP, raise_interrupt)
    try:
        with tempfile.TemporaryDirectory(prefix="relay-bench-oci-") as tmp_s:
            tmp = Path(tmp_s)
            (tmp / "logs").mkdir()
            print(f"== image: {a.layer_mib} MiB layer, written offline", flush=True)
            layout = OciLayout(tmp / "layout")
            image = layout.add_image(
                TAG,
                [
                    Platform(
                        "amd64",
                        layers=(
                            LayerSpec(MIB, seed=5),
                            LayerSpec(a.layer_mib * MIB, seed=9, gzip=False),
                        ),
                    )
                ],
            )
            with Registry(tmp / "origin") as origin:
                push_layout(layout.path, TAG, origin.host, NAME, workdir=tmp / "skopeo")
                shutil.rmtree(layout.path)
                upstream_ttfb = upstream_first_byte(origin, image, a.rate)
                for side in sides:
                    print(f"== {side.label}", flush=True)
                    try:
                        run_side(side, image, origin, tmp, a)
                    except Exception as exc:  # a side that fails is reported, not fatal
                        side.error = repr(exc)
                    print(f"   {'FAILED: ' + side.error if side.error else 'done'}", flush=True)
                    with contextlib.suppress(OSError):
                        shutil.rmtree(tmp / "relay-cache", ignore_errors=True)
                        shutil.rmtree(tmp / "registry-proxy", ignore_errors=True)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGHUP, old_hup)
    if image is None:
        return 1
    report = render(sides, image, args, a, upstream_ttfb)
    print(report)
    with contextlib.suppress(OSError):
        a.output.write_text(report)
    return 1 if any(side.error for side in sides) else 0


if __name__ == "__main__":
    raise SystemExit(main())
