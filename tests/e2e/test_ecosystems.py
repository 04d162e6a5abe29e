"""The real clients (pip, huggingface_hub, npm) through relay against test origins that answer
as pypi.org + files.pythonhosted.org, the Hub + its CDN and the npm registry (tests/ecosystems.py).
Every origin answers 403 to a request that did not come through relay."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import venv
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.config import Config, Route
from relay.errors import ConfigError
from tests.ecosystems import COMMIT, Answer, Hub, Npm, PyPI, sha256
from tests.harness import RelayThread, relay_config, running_relay, wait_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def pypi() -> Iterator[PyPI]:
    site = PyPI()
    with site.index, site.files_host:
        yield site


def _pypi_routes(site: PyPI) -> tuple[Route, ...]:
    return (
        Route(prefix="/pypi/", upstream=site.index.url + "/", allow_private=True, preset="pypi"),
        Route(
            prefix="/pyfiles/",
            upstream=site.files_host.url + "/",
            allow_private=True,
            immutable=True,
        ),
    )


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--isolated",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        env={**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_CONSTRAINT": ""},
    )


@pytest.mark.parametrize("index", ["/pypi/simple/", "/pypi/html/simple/"], ids=["json", "html"])
def test_pip_install_through_relay(pypi: PyPI, index: str, tmp_path: Path) -> None:
    with running_relay(relay_config(pypi.index.url, routes=_pypi_routes(pypi))) as relay:
        wheel_hash = sha256(pypi.files[pypi.wheel])
        (tmp_path / "req.txt").write_text(f"tinypkg==1.0 --hash=sha256:{wheel_hash}\n")
        done = _pip(
            "install",
            "--index-url",
            relay.url + index,
            "--require-hashes",
            "--only-binary",
            ":all:",
            "--target",
            str(tmp_path / "t"),
            "-r",
            "req.txt",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "t" / "tinypkg" / "__init__.py").read_text() == "VALUE = '1.0'\n"
    assert not pypi.index.bypassed()
    assert not pypi.files_host.bypassed()
    # The wheel (and the PEP 658 metadata, where pip asks for it) came through relay.
    assert f"/packages/ab/cd/{pypi.wheel}" in pypi.files_host.paths()


def test_pip_installs_the_sdist_through_relay(pypi: PyPI, tmp_path: Path) -> None:
    with running_relay(relay_config(pypi.index.url, routes=_pypi_routes(pypi))) as relay:
        sdist_hash = sha256(pypi.files[pypi.sdist])
        (tmp_path / "req.txt").write_text(f"tinypkg==1.0 --hash=sha256:{sdist_hash}\n")
        done = _pip(
            "install",
            "--index-url",
            relay.url + "/pypi/simple/",
            "--require-hashes",
            "--no-binary",
            ":all:",
            "--target",
            str(tmp_path / "t"),
            "-r",
            "req.txt",
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "t" / "tinypkg" / "__init__.py").read_text() == "VALUE = '1.0'\n"
    assert f"/packages/ab/cd/{pypi.sdist}" in pypi.files_host.paths()
    assert not pypi.files_host.bypassed()


def test_pip_downloads_the_sdist_through_relay(pypi: PyPI, tmp_path: Path) -> None:
    with running_relay(relay_config(pypi.index.url, routes=_pypi_routes(pypi))) as relay:
        page = httpx.get(relay.url + "/pypi/html/simple/tinypkg/").text
        url = next(part.split('"')[0] for part in page.split('href="')[1:] if pypi.sdist in part)
        body = httpx.get(url.split("#")[0]).content
        meta = httpx.get(url.split("#")[0].replace(pypi.sdist, pypi.wheel) + ".metadata").content
    assert url.startswith(relay.url + "/pyfiles/")
    assert url.endswith("#sha256=" + sha256(pypi.files[pypi.sdist]))
    assert sha256(body) == sha256(pypi.files[pypi.sdist])
    # The PEP 658 metadata link, with its hash, through relay too.
    assert f'data-core-metadata="sha256={sha256(meta)}"' in page
    assert meta == pypi.files[pypi.wheel + ".metadata"]
    assert not pypi.files_host.bypassed()


def test_rewritten_index_is_a_new_representation(pypi: PyPI) -> None:
    with running_relay(relay_config(pypi.index.url, routes=_pypi_routes(pypi))) as relay:
        accept = {"accept": "application/vnd.pypi.simple.v1+json", "accept-encoding": "gzip"}
        got = httpx.get(relay.url + "/pypi/simple/tinypkg/", headers=accept)
        direct = pypi.index.handle("GET", "/simple/tinypkg/", accept)
        again = httpx.get(relay.url + "/pypi/simple/tinypkg/", headers=accept)
    assert got.status_code == 200
    assert "content-length" not in got.headers
    assert got.headers["transfer-encoding"] == "chunked"
    assert "accept-ranges" not in got.headers
    assert "content-encoding" not in got.headers
    assert got.headers["etag"].startswith('W/"relay-')
    assert got.headers["etag"] != '"page-1"'
    assert again.headers["etag"] == got.headers["etag"]
    page = got.json()
    want = json.loads(direct.body)
    for mine, theirs in zip(page["files"], want["files"], strict=True):
        assert mine["url"] == theirs["url"].replace(
            pypi.files_host.url + "/", relay.url + "/pyfiles/"
        )
        assert mine["hashes"] == theirs["hashes"]
        assert mine.get("core-metadata") == theirs.get("core-metadata")
    # The upstream was asked for identity, whatever the client accepts.
    assert [h["accept-encoding"] for h in pypi.index.headers] == ["identity", "identity"]


def test_an_index_relay_cannot_rewrite_is_a_502(pypi: PyPI) -> None:
    with running_relay(relay_config(pypi.index.url, routes=_pypi_routes(pypi))) as relay:
        encoded = httpx.get(relay.url + "/pypi/gz/simple/tinypkg/")
        asked = pypi.index.requests[-1]
    assert encoded.status_code == 502
    assert encoded.text == "502 upstream sent an encoded index page\n"
    assert pypi.files_host.url not in encoded.text
    assert asked[1] == "/gz/simple/tinypkg/"


def test_a_large_page_is_rewritten_exactly(pypi: PyPI) -> None:
    with running_relay(relay_config(pypi.index.url, routes=_pypi_routes(pypi))) as relay:
        got = httpx.get(relay.url + "/pypi/big/simple/tinypkg/")
    direct = pypi.index.handle("GET", "/big/simple/tinypkg/", {}).body
    assert len(direct) > 1024 * 1024
    want = direct.replace(pypi.files_host.url.encode() + b"/", relay.url.encode() + b"/pyfiles/")
    assert got.status_code == 200
    assert sha256(got.content) == sha256(want)


def test_a_page_cut_off_upstream_is_cut_off_at_the_client(pypi: PyPI) -> None:
    config = relay_config(pypi.index.url, routes=_pypi_routes(pypi))
    with running_relay(config) as relay, pytest.raises(httpx.RemoteProtocolError):
        httpx.get(relay.url + "/pypi/cut/html/simple/tinypkg/")


def test_rewrite_is_off_by_default(pypi: PyPI) -> None:
    routes = (
        Route(prefix="/pypi/", upstream=pypi.index.url + "/", allow_private=True),
        _pypi_routes(pypi)[1],
    )
    with running_relay(relay_config(pypi.index.url, routes=routes)) as relay:
        got = httpx.get(relay.url + "/pypi/html/simple/tinypkg/")
    direct = pypi.index.handle("GET", "/simple/tinypkg/", {})
    assert got.content == direct.body
    assert got.headers["etag"] == '"page-1"'


# --- npm ----------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
@pytest.mark.parametrize("name", ["tinynpm", "@relay-test/tinynpm"])
def test_npm_install_through_relay(tmp_path: Path, name: str) -> None:
    """npm installs a plain and a scoped package (asked for as /@scope%2fname) through relay."""
    npm = Npm(name)
    with npm.site:
        routes = (
            Route(prefix="/npm/", upstream=npm.site.url + "/", allow_private=True, preset="npm"),
        )
        with running_relay(relay_config(npm.site.url, routes=routes)) as relay:
            done = subprocess.run(
                [
                    "npm",
                    "install",
                    "--registry",
                    relay.url + "/npm/",
                    "--prefix",
                    str(tmp_path / "p"),
                    "--cache",
                    str(tmp_path / "cache"),
                    "--no-audit",
                    "--no-fund",
                    "--no-update-notifier",
                    name,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            assert done.returncode == 0, done.stdout + done.stderr
    installed = tmp_path / "p" / "node_modules" / name / "package.json"
    assert json.loads(installed.read_text())["version"] == "1.0.0"
    assert not npm.site.bypassed()
    assert npm.tarball_path in npm.site.paths()


# --- huggingface_hub ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def hf_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway venv with huggingface_hub from the registry."""
    where = tmp_path_factory.mktemp("hfvenv")
    venv.create(where, with_pip=True)
    python = where / "bin" / "python"
    done = subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "huggingface_hub>=1",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    if done.returncode != 0:
        pytest.skip(f"huggingface_hub could not be installed: {done.stderr[-300:]}")
    return python


_HF_SCRIPT = """
import sys, huggingface_hub as h
path = h.hf_hub_download(sys.argv[1], sys.argv[2], revision="main")
print(path)
"""


def _hf_env(relay: RelayThread, cache: Path) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(cache),
        "HF_ENDPOINT": relay.url + "/hf",
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "NO_PROXY": "*",
    }


def _hf_download(python: Path, relay: RelayThread, cache: Path, name: str) -> Path:
    done = subprocess.run(
        [str(python), "-c", _HF_SCRIPT, Hub.repo, name],
        capture_output=True,
        text=True,
        timeout=120,
        env=_hf_env(relay, cache),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def _hub_routes(hub: Hub, mode: str) -> tuple[Route, ...]:
    cdn = hub.cdn.url.split("//")[1].split(":")[0]
    follow = {"redirects": "follow", "redirect_hosts": (cdn,)} if mode == "follow" else {}
    return (
        Route(prefix="/hf/", upstream=hub.hub.url + "/", allow_private=True, preset="hf", **follow),  # type: ignore[arg-type]
        Route(prefix="/hf-cdn/", upstream=hub.cdn.url + "/", allow_private=True, immutable=True),
    )


@pytest.mark.parametrize("mode", ["follow"])
def test_hf_hub_download_through_relay(hf_python: Path, mode: str, tmp_path: Path) -> None:
    hub = Hub()
    config = relay_config(hub.hub.url, routes=_hub_routes(hub, mode))
    with hub.hub, hub.cdn, running_relay(config) as relay:
        for name, data in [("config.json", hub.regular), *hub.lfs.items()]:
            path = _hf_download(hf_python, relay, tmp_path, name)
            assert sha256(path.read_bytes()) == sha256(data), name
            assert f"/snapshots/{COMMIT}/" in str(path)
        blobs = {p.name for p in (tmp_path / "hub").glob("models--acme--tiny/blobs/*")}
        assert {sha256(d) for d in hub.lfs.values()} <= blobs  # keyed by X-Linked-Etag
        cdn_gets = [r for r in hub.cdn.requests if r[0] == "GET"]
        assert len(cdn_gets) == 1  # model.bin; xet.bin comes from the Hub
        # A second download is answered from the client's cache: no new CDN GET.
        path = _hf_download(hf_python, relay, tmp_path, "model.bin")
        assert sha256(path.read_bytes()) == sha256(hub.lfs["model.bin"])
        assert [r for r in hub.cdn.requests if r[0] == "GET"] == cdn_gets
    assert not hub.hub.bypassed()
    assert not hub.cdn.bypassed()
    # Xet was never used: nothing asked for a Xet token.
    assert not [p for p in hub.hub.paths() if "xet" in p and "resolve" not in p]


def test_hf_download_killed_midway_completes_on_rerun(hf_python: Path, tmp_path: Path) -> None:
    hub = Hub()
    # relay's own transparent resume off: the client is the one to continue.
    config = relay_config(hub.hub.url, routes=_hub_routes(hub, "follow"), resume_attempts=0)
    with hub.hub, hub.cdn, running_relay(config) as relay:
        first = subprocess.Popen(
            [str(hf_python), "-c", _HF_SCRIPT, Hub.repo, "big.bin"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=_hf_env(relay, tmp_path),
        )
        try:
            assert hub.cut_first.reached.wait(60)
            blobs = tmp_path / "hub" / "models--acme--tiny" / "blobs"

            def partial() -> int:
                return sum(p.stat().st_size for p in blobs.glob("*.incomplete"))

            assert wait_until(lambda: partial() >= 10 * 1024 * 1024, timeout=60)
        finally:
            first.kill()
            first.wait()
            hub.cut_first.release.set()
        path = _hf_download(hf_python, relay, tmp_path, "big.bin")
        assert sha256(path.read_bytes()) == sha256(hub.big)
    # huggingface_hub 2.x downloads into a fresh temporary file each time (a killed one's is
    # left behind): the rerun fetched the whole file again, through relay.
    assert hub.cdn.ranges == []
    assert [r[0] for r in hub.cdn.requests].count("GET") == 2
    assert not hub.hub.bypassed()
    assert not hub.cdn.bypassed()


@pytest.mark.parametrize("mode", ["follow"])
def test_hf_metadata_head(mode: str) -> None:
    hub = Hub()
    config = relay_config(hub.hub.url, routes=_hub_routes(hub, mode))
    with hub.hub, hub.cdn, running_relay(config) as relay:
        url = f"{relay.url}/hf/{Hub.repo}/resolve/main/xet.bin"
        head = httpx.head(url)
    data = hub.lfs["xet.bin"]
    assert head.headers["x-repo-commit"] == COMMIT
    assert head.headers["x-linked-etag"] == f'"{sha256(data)}"'
    assert head.headers["x-linked-size"] == str(len(data))
    assert "etag" in head.headers
    assert not [h for h in head.headers if h.startswith("x-xet-")]
    assert "xet-auth" not in head.headers.get("link", "")
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data))
    assert 'rel="next"' in head.headers["link"]


def _cached_hub_config(hub: Hub, tmp_path: Path) -> Config:
    return relay_config(
        hub.hub.url,
        routes=_hub_routes(hub, "follow"),
        cache_dir=str(tmp_path / "relay-cache"),
        cache_max_bytes=256 * 1024 * 1024,
    )


def _cache_misses(relay: RelayThread) -> float:
    for line in httpx.get(relay.url + "/metrics").text.splitlines():
        if line.startswith("relay_cache_misses_total "):
            return float(line.split()[1])
    return 0.0


def test_hf_hub_download_lfs_bytes_come_from_relays_cache(hf_python: Path, tmp_path: Path) -> None:
    """Two clients with fresh caches of their own download an LFS file: the CDN sends its
    bytes once, relay's cache answers the second; both files sha256-exact and keyed by it."""
    hub = Hub()
    data = hub.lfs["model.bin"]
    with hub.hub, hub.cdn, running_relay(_cached_hub_config(hub, tmp_path)) as relay:
        for client in ("a", "b"):
            path = _hf_download(hf_python, relay, tmp_path / client, "model.bin")
            assert sha256(path.read_bytes()) == sha256(data)
            assert f"/snapshots/{COMMIT}/" in str(path)
            blobs = {p.name for p in (tmp_path / client).glob("hub/models--acme--tiny/blobs/*")}
            assert blobs == {sha256(data)}
        assert relay.settled()
    assert [r[0] for r in hub.cdn.requests].count("GET") == 1
    assert hub.cdn.body_bytes == len(data)
    assert not hub.hub.bypassed()
    assert not hub.cdn.bypassed()


def test_concurrent_hf_hub_downloads_coalesce_in_relays_cache(
    hf_python: Path, tmp_path: Path
) -> None:
    """A second huggingface_hub download of a file the first is still receiving attaches to the
    same fill: one CDN fetch, both files exact."""
    hub = Hub()
    data = hub.lfs["model.bin"]
    pause = hub.pause = Answer(pause_after=64 * 1024)
    with hub.hub, hub.cdn, running_relay(_cached_hub_config(hub, tmp_path)) as relay:
        clients = []
        try:
            for client in ("a", "b"):
                clients.append(
                    subprocess.Popen(
                        [str(hf_python), "-c", _HF_SCRIPT, Hub.repo, "model.bin"],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        env=_hf_env(relay, tmp_path / client),
                    )
                )
                if client == "a":
                    assert pause.reached.wait(60)
            # b's HEAD and GET are both answered from the fill a started (misses, not relayed).
            assert wait_until(lambda: _cache_misses(relay) == 3, timeout=60)
        finally:
            pause.release.set()
            outputs = [c.communicate(timeout=120) for c in clients]
        for client, (out, err), proc in zip("ab", outputs, clients, strict=True):
            assert proc.returncode == 0, out + err
            path = Path(out.strip().splitlines()[-1])
            assert sha256(path.read_bytes()) == sha256(data), client
    assert [r[0] for r in hub.cdn.requests].count("GET") == 1
    assert hub.cdn.body_bytes == len(data)


def test_hf_hub_download_of_a_gated_file_needs_the_token_even_when_cached(
    hf_python: Path, tmp_path: Path
) -> None:
    """huggingface_hub with the token downloads a gated LFS file (relay caches it); without the
    token it gets the Hub's refusal, not the cached bytes."""
    hub = Hub()
    hub.token = "hf_s3cret"
    hf, cdn = _hub_routes(hub, "follow")
    config = dataclasses.replace(
        _cached_hub_config(hub, tmp_path),
        routes=(dataclasses.replace(hf, forward_client_auth=True), cdn),
    )
    with hub.hub, hub.cdn, running_relay(config) as relay:
        env = _hf_env(relay, tmp_path / "a")
        allowed = subprocess.run(
            [str(hf_python), "-c", _HF_SCRIPT, Hub.repo, "model.bin"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, "HF_TOKEN": "hf_s3cret"},
        )
        refused = subprocess.run(
            [str(hf_python), "-c", _HF_SCRIPT, Hub.repo, "model.bin"],
            capture_output=True,
            text=True,
            timeout=120,
            env=_hf_env(relay, tmp_path / "b"),
        )
        assert relay.settled()
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr
    path = Path(allowed.stdout.strip().splitlines()[-1])
    assert sha256(path.read_bytes()) == sha256(hub.lfs["model.bin"])
    assert refused.returncode != 0
    assert "401" in refused.stderr
    assert not list((tmp_path / "b").glob("hub/models--acme--tiny/blobs/*"))
    assert [r[0] for r in hub.cdn.requests].count("GET") == 1
    assert all("authorization" not in headers for headers in hub.cdn.headers)


def test_hf_preset_needs_followed_redirects() -> None:
    with pytest.raises(ConfigError, match="needs redirects = 'follow'"):
        Route(prefix="/hf/", upstream="https://hub.example/", preset="hf")
