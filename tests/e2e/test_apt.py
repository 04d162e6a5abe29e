"""End to end: apt, the real client, through a `preset = "debian"` route with two mirrors.

The test builds a tiny archive (two .deb files from `dpkg-deb --build`, indexes from
`apt-ftparchive` with by-hash copies, an `InRelease` signed with a throwaway gpg key in its own
GNUPGHOME) and serves it with a static server; a second, empty server is the first mirror (it
answers 404 for everything, so every file goes on to the archive). apt runs with its own lists,
cache, sources and trusted key (`-o Dir::...`), so the machine's apt state is untouched, and
verifies the signature itself. Skipped when apt-get, apt-ftparchive, dpkg-deb or gpg is absent.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from relay.config import Mirror, Route
from tests.harness import RelayThread

pytestmark = pytest.mark.e2e

_TOOLS = ("apt-get", "apt-ftparchive", "dpkg-deb", "gpg")
_MISSING = [tool for tool in _TOOLS if shutil.which(tool) is None]
if _MISSING:
    pytest.skip(
        f"{', '.join(_MISSING)} not installed (apt-get install apt-utils gnupg)",
        allow_module_level=True,
    )

MiB = 1024 * 1024


class StaticServer:
    """A directory over HTTP (Last-Modified and If-Modified-Since, no ranges), logging the
    paths it is asked for."""

    def __init__(self, root: Path) -> None:
        self.paths: list[str] = []
        paths = self.paths

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                paths.append(self.path)

        handler = functools.partial(Handler, directory=str(root))
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> StaticServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(
        args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 0, (
        f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout + proc.stderr


class Archive:
    """A signed Debian archive with one suite, `stable`, component `main`, amd64."""

    def __init__(self, root: Path, gnupg: Path) -> None:
        self.root = root
        self.gnupg = gnupg
        self.env = {**os.environ, "GNUPGHOME": str(gnupg)}
        self.published = 0
        gnupg.mkdir(mode=0o700)
        run(
            "gpg", "--batch", "--passphrase", "", "--quick-gen-key",
            "relay test archive <archive@example.invalid>", "ed25519", "sign", "never",
            env=self.env,
        )  # fmt: skip
        self.key = root.parent / "archive-key.gpg"
        self.key.write_bytes(
            subprocess.run(
                ["gpg", "--export"], env=self.env, capture_output=True, check=True
            ).stdout
        )

    def add(self, name: str, version: str, payload: bytes) -> Path:
        """Build NAME_VERSION_all.deb into pool/ (a file of `payload` in it)."""
        build = self.root.parent / f"build-{name}-{version}"
        (build / "DEBIAN").mkdir(parents=True)
        (build / "usr" / "share" / name).mkdir(parents=True)
        (build / "usr" / "share" / name / "data").write_bytes(payload)
        (build / "DEBIAN" / "control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\n"
            f"Maintainer: relay tests <tests@example.invalid>\nDescription: {name} for tests\n"
        )
        deb = self.root / "pool" / "main" / name[0] / f"{name}_{version}_all.deb"
        deb.parent.mkdir(parents=True, exist_ok=True)
        run("dpkg-deb", "-Zgzip", "--root-owner-group", "--build", str(build), str(deb))
        return deb

    def publish(self) -> None:
        """Write the indexes, their by-hash copies, Release, InRelease and Release.gpg; every
        file gets a modification time later than at the last publication (the static server's
        Last-Modified, with one-second steps, is what a revalidation compares)."""
        dists = self.root / "dists" / "stable"
        binary = dists / "main" / "binary-amd64"
        binary.mkdir(parents=True, exist_ok=True)
        packages = run("apt-ftparchive", "packages", "pool", cwd=self.root)
        (binary / "Packages").write_text(packages)
        (binary / "Packages.gz").write_bytes(gzip.compress(packages.encode(), mtime=0))
        options = [
            "-o", "APT::FTPArchive::Release::Suite=stable",
            "-o", "APT::FTPArchive::Release::Codename=stable",
            "-o", "APT::FTPArchive::Release::Architectures=amd64",
            "-o", "APT::FTPArchive::Release::Components=main",
            "-o", "APT::FTPArchive::MD5=false",
            "-o", "APT::FTPArchive::SHA1=false",
            "-o", "APT::FTPArchive::SHA512=false",
            "-o", "APT::FTPArchive::DoByHash=true",
        ]  # fmt: skip
        release = run("apt-ftparchive", *options, "release", "dists/stable", cwd=self.root)
        release = "Acquire-By-Hash: yes\n" + release.replace("Acquire-By-Hash: yes\n", "")
        (dists / "Release").write_text(release)
        for name, args in (("InRelease", ["--clearsign"]), ("Release.gpg", ["-abs"])):
            (dists / name).unlink(missing_ok=True)
            run(
                "gpg",
                "--batch",
                *args,
                "-o",
                str(dists / name),
                str(dists / "Release"),
                env=self.env,
            )
        # A day old at first, so that a cache keeping it by heuristic freshness (10% of its
        # age) would still serve it after the next publication, ten minutes later.
        self.published += 1
        stamp = time.time() - 86400 + 600 * self.published
        for path in self.root.rglob("*"):
            os.utime(path, (stamp, stamp))


class Apt:
    """apt-get with its own state: lists, cache, sources and trusted key under `home`."""

    def __init__(self, home: Path, source: str, key: Path) -> None:
        self.home = home
        for sub in ("lists/partial", "cache/archives/partial", "state", "etc", "downloads"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        (home / "state" / "status").write_text("")
        (home / "etc" / "sources.list").write_text(f"deb [signed-by={key}] {source} stable main\n")
        self.options = [
            "-o", f"Dir::Etc::sourcelist={home / 'etc' / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::lists={home / 'lists'}",
            "-o", f"Dir::State::status={home / 'state' / 'status'}",
            "-o", f"Dir::Cache={home / 'cache'}",
            "-o", f"Dir::Etc::trusted={key}",
            "-o", "Dir::Etc::trustedparts=-",
            "-o", "Debug::NoLocking=1",
            "-o", "APT::Architecture=amd64",
            "-o", "APT::Architectures=amd64",
            "-o", "Acquire::Languages=none",
            "-o", "APT::Sandbox::User=root",
            "-o", "Acquire::Retries=0",
        ]  # fmt: skip

    def __call__(self, *args: str) -> str:
        return run("apt-get", *self.options, *args, cwd=self.home / "downloads")

    def fails(self, *args: str) -> str:
        proc = subprocess.run(
            ["apt-get", *self.options, *args],
            cwd=self.home / "downloads",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode != 0, proc.stdout + proc.stderr
        return proc.stdout + proc.stderr


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    return Archive(tmp_path / "archive", tmp_path / "gnupg")


@pytest.fixture
def mirrors(archive: Archive, tmp_path: Path) -> Iterator[tuple[StaticServer, StaticServer]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    archive.root.mkdir(exist_ok=True)
    with StaticServer(empty) as first, StaticServer(archive.root) as second:
        yield first, second


@pytest.fixture
def debian_relay(
    make_relay: Callable[..., RelayThread],
    mirrors: tuple[StaticServer, StaticServer],
    tmp_path: Path,
) -> RelayThread:
    first, second = mirrors
    route = Route(
        prefix="/debian/",
        upstreams=(Mirror(url=first.url), Mirror(url=second.url)),
        preset="debian",
        allow_private=True,
    )
    return make_relay(routes=(route,), cache_dir=str(tmp_path / "cache"), cache_max_bytes=64 * MiB)


def test_apt_updates_and_downloads_through_relay_and_sees_a_mirror_update(
    archive: Archive,
    mirrors: tuple[StaticServer, StaticServer],
    debian_relay: RelayThread,
    tmp_path: Path,
) -> None:
    first, second = mirrors
    deb = archive.add("hello-relay", "1.0", os.urandom(200_000))
    archive.add("other-relay", "2.0", b"other\n")
    archive.publish()
    apt = Apt(tmp_path / "apt", f"{debian_relay.url}/debian/", archive.key)

    apt("update")
    lists = {p.name for p in (tmp_path / "apt" / "lists").iterdir()}
    assert any(name.endswith("_stable_InRelease") for name in lists), lists
    # apt asked for the indexes by hash (Acquire-By-Hash), through relay, from the mirror that
    # has them; the first mirror was asked first and had nothing.
    by_hash = [p for p in second.paths if "/by-hash/SHA256/" in p]
    assert by_hash, second.paths
    assert any(p.endswith("/InRelease") for p in first.paths)

    apt("download", "hello-relay")
    got = tmp_path / "apt" / "downloads" / deb.name
    assert sha256_file(got) == sha256_file(deb)
    got.unlink()
    apt("download", "hello-relay")  # a pool/ file is immutable: served from the cache
    assert sha256_file(got) == sha256_file(deb)
    assert sum(p.endswith(deb.name) for p in second.paths) == 1
    got.unlink()

    # The mirror publishes a new version: the next update sees it at once (dists/ is
    # revalidated on every request), and the new package downloads.
    new = archive.add("hello-relay", "1.1", os.urandom(100_000))
    archive.publish()
    apt("update")
    apt("download", "hello-relay")
    assert sha256_file(tmp_path / "apt" / "downloads" / new.name) == sha256_file(new)
    assert debian_relay.settled()


def test_apt_refuses_an_archive_signed_by_another_key(
    archive: Archive, debian_relay: RelayThread, tmp_path: Path
) -> None:
    """The signature really is checked by apt: with another trusted key, update fails."""
    archive.add("hello-relay", "1.0", b"x")
    archive.publish()
    stranger = Archive(tmp_path / "stranger", tmp_path / "stranger-gnupg")
    apt = Apt(tmp_path / "apt", f"{debian_relay.url}/debian/", stranger.key)
    output = apt.fails("update", "-o", "APT::Update::Error-Mode=any")
    assert "NO_PUBKEY" in output or "not signed" in output or "signature" in output.lower()
    with contextlib.suppress(FileNotFoundError):
        shutil.rmtree(tmp_path / "stranger-gnupg")
