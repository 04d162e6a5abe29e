"""Package mirrors through the read-through cache: pypi/npm index pages stored as the upstream
sent them (under its freshness, one copy per negotiated form) and rewritten for each request's
Host as they are served; the real clients installing twice against the test origins of
tests/ecosystems.py, counting the origins' requests."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.config import Config, Route
from relay.proxy.rewrite import rewritten_etag
from tests.e2e.caching import stored_data
from tests.e2e.test_ecosystems import _pip, _pypi_routes
from tests.ecosystems import Npm, PyPI, sha256
from tests.harness import relay_config, running_relay, wait_until

pytestmark = pytest.mark.e2e

JSON = "application/vnd.pypi.simple.v1+json"
PAGE = "/simple/tinypkg/"


@pytest.fixture
def pypi() -> Iterator[PyPI]:
    site = PyPI()
    with site.index, site.files_host:
        yield site


def _cached(config: Config, tmp_path: Path) -> Config:
    return dataclasses.replace(
        config, cache_dir=str(tmp_path / "cache"), cache_max_bytes=64 * 1024 * 1024
    )


def _pypi_relay(pypi: PyPI, tmp_path: Path) -> Config:
    return _cached(relay_config(pypi.index.url, routes=_pypi_routes(pypi)), tmp_path)


def _gets(paths: list[str], path: str) -> int:
    return paths.count(path)


def _rewritten(pypi: PyPI, path: str, headers: dict[str, str], public: str) -> bytes:
    """The page at `path` as the origin sends it, with its file links pointing at `public`."""
    body = pypi.index.handle("GET", path, headers).body
    return body.replace(pypi.files_host.url.encode() + b"/", public.encode() + b"/pyfiles/")


def _stored(tmp_path: Path) -> list[Path]:
    return stored_data(tmp_path / "cache")


def test_pip_installs_twice_each_index_page_and_file_fetched_once(
    pypi: PyPI, tmp_path: Path
) -> None:
    """Two pip installs (no pip cache) through a cached relay: the index asked once while
    fresh, each file once."""
    wheel_hash = sha256(pypi.files[pypi.wheel])
    (tmp_path / "req.txt").write_text(f"tinypkg==1.0 --hash=sha256:{wheel_hash}\n")
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        for run in ("a", "b"):
            done = _pip(
                "install",
                "--index-url",
                relay.url + "/pypi/simple/",
                "--require-hashes",
                "--only-binary",
                ":all:",
                "--target",
                str(tmp_path / run),
                "-r",
                "req.txt",
                cwd=tmp_path,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            installed = tmp_path / run / "tinypkg" / "__init__.py"
            assert installed.read_text() == "VALUE = '1.0'\n"
        assert relay.settled()
    assert _gets(pypi.index.paths(), PAGE) == 1
    files = pypi.files_host.paths()
    assert _gets(files, f"/packages/ab/cd/{pypi.wheel}") == 1
    assert all(files.count(path) == 1 for path in files), files
    # pip asked for the JSON form (PEP 691), and got it rewritten both times.
    assert JSON in pypi.index.headers[0]["accept"]
    assert not pypi.index.bypassed()
    assert not pypi.files_host.bypassed()


def test_json_and_html_forms_are_cached_apart(pypi: PyPI, tmp_path: Path) -> None:
    """One URL, two forms by Accept (the upstream says `Vary: Accept`): each stored once and
    each served as its own form, rewritten."""
    forms = {"json": {"accept": JSON}, "html": {"accept": "text/html"}}
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        answers = {
            (form, n): httpx.get(relay.url + "/pypi" + PAGE, headers=accept)
            for n in (1, 2)
            for form, accept in forms.items()
        }
    assert _gets(pypi.index.paths(), PAGE) == 2
    for (form, n), got in answers.items():
        assert got.status_code == 200
        want = _rewritten(pypi, PAGE, forms[form], relay.url)
        assert sha256(got.content) == sha256(want), (form, n)
        kind = JSON if form == "json" else "text/html"
        assert got.headers["content-type"] == kind
        status = got.headers["cache-status"]
        assert status.startswith("relay; hit") if n == 2 else "fwd=miss" in status
    json.loads(answers["json", 2].content)
    assert answers["json", 2].headers["etag"] != answers["html", 2].headers["etag"]


def test_a_cached_page_has_the_relayed_pages_head(pypi: PyPI, tmp_path: Path) -> None:
    """Miss and hit: chunked, relay's weak ETag for this base (as the relayed path makes it),
    no Content-Length / Accept-Ranges / digests, plus Age and Cache-Status; a Range is
    ignored (200)."""
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        url = relay.url + "/pypi" + PAGE
        miss = httpx.get(url, headers={"accept": JSON})
        hit = httpx.get(url, headers={"accept": JSON, "range": "bytes=0-9"})
        head = httpx.head(url, headers={"accept": JSON})
    etag = rewritten_etag('"page-1-json"', relay.url, "pypi")
    for got in (miss, hit, head):
        assert got.status_code == 200
        assert got.headers["etag"] == etag
        assert "content-length" not in got.headers
        assert "accept-ranges" not in got.headers
        assert "content-range" not in got.headers
        assert "age" in got.headers
        assert got.headers["vary"] == "Accept, Accept-Encoding"
    assert miss.headers["transfer-encoding"] == "chunked"
    assert hit.headers["transfer-encoding"] == "chunked"
    assert miss.headers["cache-status"] == "relay; fwd=miss"
    assert hit.headers["cache-status"].startswith("relay; hit; ttl=")
    assert hit.content == miss.content == _rewritten(pypi, PAGE, {"accept": JSON}, relay.url)
    assert _gets(pypi.index.paths(), PAGE) == 1


def test_one_stored_page_is_rewritten_per_host(pypi: PyPI, tmp_path: Path) -> None:
    """Asked under two Hosts: one upstream fetch, each answer's links and ETag for its own
    Host; relay's ETag for the same Host gets a 304 from the cache, another Host's a 200."""
    hosts = ("mirror-a.example:8000", "mirror-b.example")
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        url = relay.url + "/pypi" + PAGE
        got = {host: httpx.get(url, headers={"host": host, "accept": JSON}) for host in hosts}
        etag_a = got[hosts[0]].headers["etag"]
        same = httpx.get(url, headers={"host": hosts[0], "accept": JSON, "if-none-match": etag_a})
        other = httpx.get(url, headers={"host": hosts[1], "accept": JSON, "if-none-match": etag_a})
        upstreams = httpx.get(
            url, headers={"host": hosts[0], "accept": JSON, "if-none-match": '"page-1-json"'}
        )
    assert _gets(pypi.index.paths(), PAGE) == 1
    for host in hosts:
        public = f"http://{host}"
        assert got[host].content == _rewritten(pypi, PAGE, {"accept": JSON}, public)
        assert got[host].headers["etag"] == rewritten_etag('"page-1-json"', public, "pypi")
    assert got[hosts[0]].headers["etag"] != got[hosts[1]].headers["etag"]
    assert same.status_code == 304
    assert same.headers["etag"] == etag_a
    assert same.headers["cache-status"].startswith("relay; hit")
    assert same.content == b""
    assert other.status_code == 200
    assert other.content == got[hosts[1]].content
    # The upstream's own ETag names another representation: a full 200.
    assert upstreams.status_code == 200
    assert upstreams.content == got[hosts[0]].content


def test_a_stale_page_is_revalidated_with_one_conditional_request(
    pypi: PyPI, tmp_path: Path
) -> None:
    """max-age=0: the next request revalidates with the stored ETag, the 304 refreshes the
    page, and the answer is the stored page rewritten."""
    pypi.max_age = 0
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        url = relay.url + "/pypi" + PAGE
        first = httpx.get(url, headers={"accept": JSON})
        second = httpx.get(url, headers={"accept": JSON})
    requests = zip(pypi.index.requests, pypi.index.headers, strict=True)
    asked = [headers for (_, path, _), headers in requests if path == PAGE]
    assert len(asked) == 2
    assert "if-none-match" not in asked[0]
    assert asked[1]["if-none-match"] == '"page-1-json"'
    assert second.status_code == 200
    assert second.headers["cache-status"] == "relay; fwd=stale; fwd-status=304"
    assert second.content == first.content == _rewritten(pypi, PAGE, {"accept": JSON}, relay.url)
    assert second.headers["etag"] == first.headers["etag"]


def test_a_stale_page_is_served_rewritten_when_the_index_is_down(
    pypi: PyPI, tmp_path: Path
) -> None:
    """stale-if-error (the route's `cache_stale_if_error`): with the index failing, the
    stored page is served, rewritten for this request's Host, and says so."""
    pypi.max_age = 0
    index, files = _pypi_routes(pypi)
    routes = (dataclasses.replace(index, cache_stale_if_error=600.0), files)
    config = _cached(relay_config(pypi.index.url, routes=routes), tmp_path)
    with running_relay(config) as relay:
        url = relay.url + "/pypi" + PAGE
        first = httpx.get(url, headers={"accept": JSON})
        want = _rewritten(pypi, PAGE, {"accept": JSON}, "http://mirror.example")
        pypi.failing = True
        down = httpx.get(url, headers={"accept": JSON, "host": "mirror.example"})
    assert first.status_code == down.status_code == 200
    assert down.content == want
    assert down.headers["cache-status"].startswith("relay; hit; fwd=stale; fwd-status=503")
    assert 'detail="stale-if-error"' in down.headers["cache-status"]
    assert down.headers["etag"] == rewritten_etag('"page-1-json"', "http://mirror.example", "pypi")


def test_a_page_being_filled_is_rewritten_to_every_client_as_it_arrives(
    pypi: PyPI, tmp_path: Path
) -> None:
    """The origin sends half the page and holds: two clients attached to the one fill each
    get the first half rewritten before the rest exists, then the whole page."""
    path = "/slow/html/simple/tinypkg/"
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        want = _rewritten(pypi, path.removeprefix("/slow"), {}, relay.url)
        # Up to the first file link's prefix, rewritten: in the half the origin has sent.
        half = want[: want.index(b"/pyfiles/") + len(b"/pyfiles/")]
        received: list[bytearray] = [bytearray(), bytearray()]
        early = [threading.Event(), threading.Event()]

        def read(n: int) -> None:
            with httpx.stream("GET", relay.url + "/pypi" + path, timeout=30) as got:
                for chunk in got.iter_raw():
                    received[n] += chunk
                    if received[n].startswith(half):
                        early[n].set()

        readers = [threading.Thread(target=read, args=(n,)) for n in (0, 1)]
        for reader in readers:
            reader.start()
        try:
            assert all(event.wait(30) for event in early)
            assert not pypi.slow.release.is_set()
        finally:
            pypi.slow.release.set()
            for reader in readers:
                reader.join(30)
        assert relay.settled()
    assert [bytes(r) for r in received] == [want, want]
    assert _gets(pypi.index.paths(), path) == 1


def test_a_large_cached_page_is_rewritten_exactly(pypi: PyPI, tmp_path: Path) -> None:
    """A page of many MiB, stored then served (read from disk in chunks, URLs split across
    them): byte-exact, on the miss and on the hit."""
    path = "/big/simple/tinypkg/"
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        answers = [httpx.get(relay.url + "/pypi" + path) for _ in range(2)]
    want = _rewritten(pypi, path, {}, relay.url)
    assert len(want) > 1024 * 1024
    assert [sha256(got.content) for got in answers] == [sha256(want)] * 2
    assert answers[1].headers["cache-status"].startswith("relay; hit")
    assert _gets(pypi.index.paths(), path) == 1


@pytest.mark.parametrize(
    ("kind", "reason"), [("gz", "an encoded index page"), ("partial", "a partial index page")]
)
def test_an_index_relay_cannot_rewrite_is_refused_and_not_stored(
    pypi: PyPI, tmp_path: Path, kind: str, reason: str
) -> None:
    """An encoded index, or a 206 of one: 502 as on the relayed path, never stored."""
    with running_relay(_pypi_relay(pypi, tmp_path)) as relay:
        answers = [httpx.get(f"{relay.url}/pypi/{kind}{PAGE}") for _ in range(2)]
        assert relay.settled()
    for got in answers:
        assert got.status_code == 502
        assert got.text == f"502 upstream sent {reason}\n"
    assert _stored(tmp_path) == []


# --- npm ----------------------------------------------------------------------------------


def _npm_install(registry: str, where: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "npm",
            "install",
            "--registry",
            registry,
            "--prefix",
            str(where / "p"),
            "--cache",
            str(where / "cache"),
            "--no-audit",
            "--no-fund",
            "--no-update-notifier",
            name,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=where,
    )


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_npm_installs_twice_packument_fetched_once(tmp_path: Path) -> None:
    """Two npm installs (fresh npm caches) through a cached relay: the packument asked once
    while fresh, the tarball once."""
    npm = Npm()
    with npm.site:
        routes = (
            Route(prefix="/npm/", upstream=npm.site.url + "/", allow_private=True, preset="npm"),
        )
        config = _cached(relay_config(npm.site.url, routes=routes), tmp_path)
        with running_relay(config) as relay:
            for run in ("a", "b"):
                (tmp_path / run).mkdir()
                done = _npm_install(relay.url + "/npm/", tmp_path / run, npm.name)
                assert done.returncode == 0, done.stdout + done.stderr
                installed = tmp_path / run / "p" / "node_modules" / npm.name / "package.json"
                assert json.loads(installed.read_text())["version"] == "1.0.0"
            assert wait_until(relay.settled)
    paths = npm.site.paths()
    assert paths.count("/" + npm.name) == 1
    assert paths.count(npm.tarball_path) == 1
    assert not npm.site.bypassed()


def test_tarballs_on_a_preset_route_are_cached_unchanged(tmp_path: Path) -> None:
    """An npm tarball on the npm route itself (an immutable file, not an index page): cached
    as it is, its ranges answered from the cache; the packument is rewritten."""
    npm = Npm()
    with npm.site:
        routes = (
            Route(prefix="/npm/", upstream=npm.site.url + "/", allow_private=True, preset="npm"),
        )
        config = _cached(relay_config(npm.site.url, routes=routes), tmp_path)
        with running_relay(config) as relay:
            url = relay.url + "/npm" + npm.tarball_path
            whole = [httpx.get(url) for _ in range(2)]
            part = httpx.get(url, headers={"range": "bytes=0-9"})
            packument = httpx.get(relay.url + "/npm/" + npm.name).json()
    assert [got.content for got in whole] == [npm.tarball, npm.tarball]
    assert whole[1].headers["content-length"] == str(len(npm.tarball))
    assert whole[1].headers["etag"] == f'"{hashlib.sha1(npm.tarball).hexdigest()}"'
    assert whole[1].headers["cache-status"].startswith("relay; hit")
    assert part.status_code == 206
    assert part.content == npm.tarball[:10]
    assert npm.site.paths().count(npm.tarball_path) == 1
    tarball = packument["versions"][npm.version]["dist"]["tarball"]
    assert tarball == relay.url + "/npm" + npm.tarball_path
