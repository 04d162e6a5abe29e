"""The real container clients, driven against a registry URL (relay's, in the tests).

Each verifies every blob's digest itself, so a pull that succeeds received the right bytes:
skopeo (containers/image) and podman check each blob and manifest against its digest,
containerd's content store refuses a blob whose digest differs.

- `skopeo_copy(ref, dest)`: `skopeo copy docker://<ref> oci:<dest>`; returns the copied
  manifest's digest. `skopeo_inspect(ref)`: the parsed `skopeo inspect` output.
- `podman_pull(name, mirror, workdir)`: `podman pull <name>` with a registries.conf whose
  registry `registry.test` is mirrored at `mirror` (a `host:port/path` location) and whose own
  location is a dead port, so only the mirror can answer; vfs storage, root, runroot, tmp and
  XDG directories under `workdir`. Returns the pulled manifest digest.
- `Containerd(workdir)`: a containerd daemon of the test's own (root, state, socket, config
  under `workdir`; the CRI and opt plugins off), and `pull(name, mirror_url)`:
  `ctr images pull --hosts-dir` with a hosts.toml mirroring `registry.test` at `mirror_url`
  (containerd then sends `?ns=registry.test`). Returns the pulled top-level digest.

A failed client raises `ClientFailed` with the end of its output.

What it takes to run them here without touching the machine (found by trying; Debian 12's
skopeo 1.9, podman 4.3, containerd 1.6): every containers/image path through the environment
(`HOME`, `XDG_*`, `TMPDIR`, `CONTAINERS_REGISTRIES_CONF`, `CONTAINERS_CONF` and
`REGISTRY_AUTH_FILE`, the last two files must exist) plus `--policy` for skopeo (podman reads
/etc/containers/policy.json, read-only); podman's `--root`, `--runroot` (under 50 characters,
else it refuses), `--tmpdir`, vfs, `--cgroup-manager cgroupfs --events-backend none`; an
`insecure = true` mirror is tried with TLS first, so a plain-http server must answer a
ClientHello at once (uvicorn answers 400; tests/oci_fault_proxy.py closes). skopeo copies to an
OCI layout compress uncompressed layers unless `--dest-oci-accept-uncompressed-layers` (the
digests would change). containerd: its own `root`, `state`, gRPC and ttrpc sockets, debug and
metrics off, the CRI, opt, btrfs, zfs, devmapper, aufs and tracing plugins off; `ctr images
pull --snapshotter native` unpacks with bind mounts (root with CAP_SYS_ADMIN, as here and in
CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from tests.harness import wait_until
from tests.oci_upstream import skopeo_env, stop_process

SKOPEO = shutil.which("skopeo")
PODMAN = shutil.which("podman")
CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")
UPSTREAM_NAME = "registry.test"
"""The registry name clients pull from; only ever reached through a mirror."""
DEAD = "127.0.0.1:9"
"""Where `registry.test` itself would be: the discard port, nothing listens."""


class ClientFailed(AssertionError):
    """A client exited non-zero."""


def _run(args: list[str], env: dict[str, str], timeout: float) -> str:
    proc = subprocess.run(args, env=env, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode(errors="replace")[-3000:]
        raise ClientFailed(f"{Path(args[0]).name} exited {proc.returncode}:\n{out}")
    return proc.stdout.decode(errors="replace")


def _skopeo(workdir: Path, *args: str, timeout: float) -> str:
    assert SKOPEO is not None
    env = skopeo_env(workdir)
    return _run([SKOPEO, "--policy", str(workdir / "policy.json"), *args], env, timeout)


def skopeo_copy(
    ref: str,
    dest: Path,
    *,
    workdir: Path,
    creds: tuple[str, str] | None = None,
    all_platforms: bool = False,
    timeout: float = 300,
) -> str:
    """Copy `docker://<ref>` (plain http) to the OCI layout `dest`; the copied top digest."""
    args = ["copy", "--quiet", "--src-tls-verify=false", "--preserve-digests"]
    args += ["--dest-oci-accept-uncompressed-layers"]
    if all_platforms:
        args.append("--all")
    if creds is not None:
        args += ["--src-creds", f"{creds[0]}:{creds[1]}"]
    _skopeo(workdir, *args, f"docker://{ref}", f"oci:{dest}:pulled", timeout=timeout)
    index = json.loads((dest / "index.json").read_text())
    digest: str = index["manifests"][-1]["digest"]
    return digest


def skopeo_inspect(
    ref: str,
    *,
    workdir: Path,
    raw: bool = False,
    creds: tuple[str, str] | None = None,
    timeout: float = 120,
) -> dict[str, Any]:
    args = ["inspect", "--tls-verify=false"] + (["--raw"] if raw else [])
    if creds is not None:
        args += ["--creds", f"{creds[0]}:{creds[1]}"]
    out = _skopeo(workdir, *args, f"docker://{ref}", timeout=timeout)
    parsed: dict[str, Any] = json.loads(out)
    return parsed


def skopeo_list_tags(repo: str, *, workdir: Path, timeout: float = 60) -> list[str]:
    """`skopeo list-tags docker://<repo>`: the repository's tags."""
    out = _skopeo(workdir, "list-tags", "--tls-verify=false", f"docker://{repo}", timeout=timeout)
    tags: list[str] = json.loads(out)["Tags"]
    return tags


def registries_conf(mirror: str) -> str:
    """registries.conf: `registry.test` (dead itself) mirrored at `mirror` (host:port/path)."""
    return (
        "unqualified-search-registries = []\n"
        "[[registry]]\n"
        f'prefix = "{UPSTREAM_NAME}"\n'
        f'location = "{DEAD}"\n'
        "insecure = true\n"
        "[[registry.mirror]]\n"
        f'location = "{mirror}"\n'
        "insecure = true\n"
    )


def podman_pull(name: str, mirror: str, *, workdir: Path, timeout: float = 300) -> str:
    """`podman pull registry.test/<name>` through the mirror; the pulled manifest digest."""
    assert PODMAN is not None
    env = skopeo_env(workdir)
    Path(env["CONTAINERS_REGISTRIES_CONF"]).write_text(registries_conf(mirror))
    # podman refuses a runroot path over 50 characters: a short one of its own, removed after.
    runroot = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    try:
        storage = workdir / "storage.conf"
        storage.write_text(
            f'[storage]\ndriver = "vfs"\nrunroot = "{runroot}"\ngraphroot = "{workdir / "root"}"\n'
        )
        env["CONTAINERS_STORAGE_CONF"] = str(storage)
        return _podman(name, workdir, runroot, env, timeout)
    finally:
        shutil.rmtree(runroot, ignore_errors=True)


def _podman(name: str, workdir: Path, runroot: Path, env: dict[str, str], timeout: float) -> str:
    assert PODMAN is not None
    base = [
        PODMAN,
        "--root",
        str(workdir / "root"),
        "--runroot",
        str(runroot),
        "--storage-driver",
        "vfs",
        "--tmpdir",
        str(workdir / "tmp"),
        "--cgroup-manager",
        "cgroupfs",
        "--events-backend",
        "none",
    ]
    ref = f"{UPSTREAM_NAME}/{name}"
    _run([*base, "pull", "--quiet", ref], env, timeout)
    return _run([*base, "image", "inspect", "--format", "{{.Digest}}", ref], env, 60).strip()


class Containerd:
    """A containerd daemon of the test's own (see the module docstring)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.socket = workdir / "containerd.sock"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Containerd:
        assert CONTAINERD is not None
        assert CTR is not None
        self.workdir.mkdir(parents=True, exist_ok=True)
        disabled = [
            "io.containerd.grpc.v1.cri",
            "io.containerd.internal.v1.opt",
            "io.containerd.snapshotter.v1.btrfs",
            "io.containerd.snapshotter.v1.zfs",
            "io.containerd.snapshotter.v1.devmapper",
            "io.containerd.snapshotter.v1.aufs",
            "io.containerd.tracing.processor.v1.otlp",
            "io.containerd.internal.v1.tracing",
        ]
        config = self.workdir / "config.toml"
        config.write_text(
            "version = 2\n"
            f'root = "{self.workdir / "root"}"\n'
            f'state = "{self.workdir / "state"}"\n'
            f"disabled_plugins = {json.dumps(disabled)}\n"
            f'[grpc]\n  address = "{self.socket}"\n'
            f'[ttrpc]\n  address = "{self.workdir / "ttrpc.sock"}"\n'
            '[debug]\n  address = ""\n'
            '[metrics]\n  address = ""\n'
        )
        log = (self.workdir / "containerd.log").open("ab")
        try:
            self._proc = subprocess.Popen(
                [CONTAINERD, "--config", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
            )
        finally:
            log.close()
        if not wait_until(self._ready, timeout=20):
            self.stop()
            tail = (self.workdir / "containerd.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"containerd did not start:\n{tail}")
        return self

    def _ready(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return True
        if not self.socket.exists():
            return False
        assert CTR is not None
        probe = subprocess.run(
            [CTR, "--address", str(self.socket), "version"], capture_output=True, check=False
        )
        return probe.returncode == 0

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc)

    def __enter__(self) -> Containerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ctr(self, *args: str, timeout: float = 300) -> str:
        assert CTR is not None
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)}
        return _run([CTR, "--address", str(self.socket), *args], env, timeout)

    def hosts_dir(self, mirror_url: str) -> Path:
        """A hosts directory mirroring `registry.test` at `mirror_url` (http://host:port)."""
        hosts = self.workdir / "hosts"
        (hosts / UPSTREAM_NAME).mkdir(parents=True, exist_ok=True)
        (hosts / UPSTREAM_NAME / "hosts.toml").write_text(
            f'server = "http://{DEAD}"\n'
            f'[host."{mirror_url}"]\n'
            '  capabilities = ["pull", "resolve"]\n'
        )
        return hosts

    def pull(self, name: str, mirror_url: str, *, timeout: float = 300) -> str:
        """`ctr images pull registry.test/<name>` through the mirror; the image's digest."""
        ref = f"{UPSTREAM_NAME}/{name}"
        hosts = self.hosts_dir(mirror_url)
        self.ctr(
            "images",
            "pull",
            "--hosts-dir",
            str(hosts),
            "--plain-http",
            "--snapshotter",
            "native",
            ref,
            timeout=timeout,
        )
        for line in self.ctr("images", "ls").splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == ref:
                return fields[2]
        raise ClientFailed(f"ctr pulled {ref} but does not list it")
