"""Test origins that answer as the package ecosystems do: a PyPI simple index (pypi.org), its
files host (files.pythonhosted.org), the Hugging Face Hub with its CDN, and the npm registry.

Each site is a threaded HTTP/1.1 server on loopback (like tests/origin.py, stdlib only). The
file hosts, the Hub and the registry answer 403 to any request that did not come through relay
(no `Via: 1.1 relay`), so a client that bypasses relay fails, and every request is recorded.
File links point at another site by absolute URL, as on the real hosts.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import threading
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

from tests.loopback import LoopbackServer

RELAY_VIA = "1.1 relay"


@dataclass
class Answer:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    hold_after: int | None = None
    """Send this many body bytes, set `reached`, wait for `release`, then close (cut)."""
    reached: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    finish: bool = False
    """With `hold_after`: once released, send the rest instead of closing (a slow page)."""
    pause_after: int | None = None
    """Send this many body bytes, set `reached`, wait for `release`, then send the rest."""


Handler = Callable[[str, str, dict[str, str]], Answer]


class Site(LoopbackServer):
    """One host: `handle(method, path, headers) -> Answer`; records (method, path, via)."""

    def __init__(self, handle: Handler, *, relay_only: bool = True) -> None:
        self.handle = handle
        self.relay_only = relay_only
        self.requests: list[tuple[str, str, str]] = []
        self.ranges: list[str] = []
        self.headers: list[dict[str, str]] = []
        """Each request's headers, names lower-cased."""
        self.body_bytes = 0
        """Body bytes sent, all requests together."""
        site = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                via = headers.get("via", "")
                site.requests.append((self.command, self.path, via))
                site.headers.append(headers)
                if "range" in headers:
                    site.ranges.append(headers["range"])
                if site.relay_only and RELAY_VIA not in via:
                    answer = Answer(403, b"only through relay\n")
                else:
                    answer = site.handle(self.command, self.path, headers)
                self.send_response(answer.status)
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in answer.headers:
                    self.send_header("Content-Length", str(len(answer.body)))
                self.end_headers()
                if self.command == "HEAD":
                    return
                if answer.pause_after is not None:
                    self._send(answer.body[: answer.pause_after])
                    self.wfile.flush()
                    answer.reached.set()
                    answer.release.wait(60)
                    self._send(answer.body[answer.pause_after :])
                    return
                if answer.hold_after is None:
                    self._send(answer.body)
                    return
                self._send(answer.body[: answer.hold_after])
                self.wfile.flush()
                answer.reached.set()
                answer.release.wait(60)
                if answer.finish:
                    self._send(answer.body[answer.hold_after :])
                    return
                self.close_connection = True

            do_GET = do_HEAD = _answer

            def _send(self, data: bytes) -> None:
                self.wfile.write(data)
                site.body_bytes += len(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        LoopbackServer.started()
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests]

    def bypassed(self) -> list[str]:
        return [path for _, path, via in self.requests if RELAY_VIA not in via]

    def __enter__(self) -> Site:
        self._thread.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._server.shutdown()
        self._server.server_close()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- Python packages ----------------------------------------------------------------------


def make_wheel(name: str, version: str) -> tuple[str, bytes, bytes]:
    """A pure-Python wheel (file name, bytes, METADATA) with a correct RECORD."""
    dist = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n\n".encode()
    files = {
        f"{name}/__init__.py": f"VALUE = {version!r}\n".encode(),
        f"{dist}/METADATA": metadata,
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\n"
        b"Tag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in files.items():
            zf.writestr(path, data)
    return f"{name}-{version}-py3-none-any.whl", out.getvalue(), metadata


def make_sdist(name: str, version: str) -> tuple[str, bytes]:
    """An sdist with an in-tree PEP 517 backend (no build requirements, so pip builds it
    offline) that hands pip the wheel it carries."""
    wheel, wheel_data, _ = make_wheel(name, version)
    backend = (
        "import os, shutil\n"
        "def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):\n"
        f"    shutil.copy(os.path.join(os.path.dirname(__file__), {wheel!r}), wheel_directory)\n"
        f"    return {wheel!r}\n"
    ).encode()
    root = f"{name}-{version}"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for path, data in {
            f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\n"
            f"Version: {version}\n".encode(),
            f"{root}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\n'
            b'backend-path = ["."]\n',
            f"{root}/backend.py": backend,
            f"{root}/{wheel}": wheel_data,
        }.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return f"{name}-{version}.tar.gz", out.getvalue()


class PyPI(LoopbackServer):
    """pypi.org (simple index: JSON or HTML by Accept at /simple/, HTML only at /html/simple/,
    always gzip-encoded at /gz/..., always a 206 at /partial/..., 4000 times over at /big/...,
    cut halfway at /cut/...,
    held halfway until `slow.release` at /slow/...) and files.pythonhosted.org
    (/packages/...), as two sites, with pypi.org's caching headers: index pages
    `Cache-Control: max-age=600, public` (`max_age`), `Vary: Accept, Accept-Encoding`, an
    ETag per form, answered 304 to a matching If-None-Match; files immutable for a year."""

    def __init__(self, name: str = "tinypkg", version: str = "1.0") -> None:
        self.name = name
        self.max_age = 600
        self.failing = False
        """Index pages answer 503 (the index down) while set."""
        self.slow = Answer(finish=True)
        """The page at /slow/...: half sent, then held until `slow.release` is set."""
        wheel, data, metadata = make_wheel(name, version)
        sdist, sdist_data = make_sdist(name, version)
        self.files = {wheel: data, sdist: sdist_data, wheel + ".metadata": metadata}
        self.wheel = wheel
        self.sdist = sdist
        self.files_host = Site(self._file)
        self.index = Site(self._page)

    def _file(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        name = path.removeprefix("/packages/ab/cd/")
        if name not in self.files:
            return Answer(404, b"not found\n")
        return Answer(
            200,
            self.files[name],
            {
                "Content-Type": "application/octet-stream",
                "Cache-Control": "max-age=365000000, immutable, public",
                "ETag": f'"{sha256(self.files[name])[:16]}"',
            },
        )

    def _links(self) -> list[tuple[str, str, str]]:
        base = self.files_host.url + "/packages/ab/cd/"
        meta = sha256(self.files[self.wheel + ".metadata"])
        return [
            (self.wheel, base + self.wheel, meta),
            (self.sdist, base + self.sdist, ""),
        ]

    def _page(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if self.failing:
            return Answer(503, b"unavailable\n", {"Content-Type": "text/plain"})
        if path.startswith("/gz/"):
            # An upstream that encodes whatever it was asked for.
            page = self._page(method, path.removeprefix("/gz"), headers)
            page.headers["Content-Encoding"] = "gzip"
            page.body = gzip.compress(page.body)
            return page
        if path.startswith("/big/"):
            # A page of many links, relayed in many chunks.
            page = self._page(method, "/html" + path.removeprefix("/big"), headers)
            page.body = page.body * 4000
            return page
        if path.startswith("/cut/"):
            # The page is cut off halfway.
            page = self._page(method, path.removeprefix("/cut"), headers)
            page.hold_after = len(page.body) // 2
            page.release.set()
            return page
        if path.startswith("/partial/"):
            # An upstream that answers a page with a 206, asked for a range or not.
            page = self._page(method, path.removeprefix("/partial"), headers)
            page.headers["Content-Range"] = f"bytes 0-{len(page.body) - 1}/{len(page.body) + 1}"
            page.status = 206
            return page
        if path.startswith("/slow/"):
            page = self._page(method, path.removeprefix("/slow"), headers)
            slow = self.slow
            slow.status, slow.body, slow.headers = page.status, page.body, page.headers
            slow.hold_after = len(page.body) // 2
            return slow
        html_only = path.startswith("/html/")
        path = path.removeprefix("/html")
        if path != f"/simple/{self.name}/":
            return Answer(404, b"not found\n")
        if not html_only and "application/vnd.pypi.simple.v1+json" in headers.get("accept", ""):
            files = []
            for name, url, meta in self._links():
                entry: dict[str, object] = {
                    "filename": name,
                    "url": url,
                    "hashes": {"sha256": sha256(self.files[name])},
                }
                if meta:
                    entry["core-metadata"] = {"sha256": meta}
                    entry["data-dist-info-metadata"] = {"sha256": meta}
                files.append(entry)
            body = json.dumps(
                {"meta": {"api-version": "1.1"}, "name": self.name, "files": files}
            ).encode()
            kind = "application/vnd.pypi.simple.v1+json"
            etag = '"page-1-json"'
        else:
            links = []
            for name, url, meta in self._links():
                attrs = (
                    f' data-core-metadata="sha256={meta}" data-dist-info-metadata="sha256={meta}"'
                    if meta
                    else ""
                )
                links.append(f'<a href="{url}#sha256={sha256(self.files[name])}"{attrs}>{name}</a>')
            body = (
                "<!DOCTYPE html><html><body>\n" + "<br/>\n".join(links) + "\n</body></html>\n"
            ).encode()
            kind = "text/html"
            etag = '"page-1"'
        caching = {
            "ETag": etag,
            "Cache-Control": f"max-age={self.max_age}, public",
            "Vary": "Accept, Accept-Encoding",
        }
        if headers.get("if-none-match") == etag:
            return Answer(304, b"", caching)
        return Answer(200, body, {"Content-Type": kind, **caching})


# --- Hugging Face Hub ---------------------------------------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Hub(LoopbackServer):
    """The Hub (`/<repo>/resolve/<rev>/<file>`): a regular file answered directly, LFS files
    by a 302 to the CDN with X-Repo-Commit / X-Linked-Etag / X-Linked-Size; `xet.bin` is
    answered by the Hub with Xet headers (X-Xet-Hash, X-Xet-Refresh-Route, Link
    rel="xet-auth")."""

    repo = "acme/tiny"

    def __init__(self) -> None:
        self.regular = b'{"model_type": "tiny"}\n'
        self.lfs = {"model.bin": bytes(range(256)) * 1024, "xet.bin": b"xet" * 50000}
        # Bigger than huggingface_hub's 10 MiB write chunk, so a killed download leaves some.
        self.big = hashlib.sha256(b"big").digest() * (12 * 1024 * 1024 // 32)
        self.cut_first = Answer(hold_after=11 * 1024 * 1024)
        """The first plain GET of big.bin sends 11 MiB, then waits for `release`, then cuts."""
        self.commit = COMMIT
        """What `main` resolves to (X-Repo-Commit); a test moves the branch by changing it
        and the bytes in `lfs`."""
        self.token: str | None = None
        """Gated: every Hub answer is a 401 without `Authorization: Bearer <token>`."""
        self.tampered: dict[str, bytes] = {}
        """sha256 -> the bytes the CDN sends for it instead (a corrupt CDN)."""
        self.hop = False
        """The Hub's redirects go to the CDN's `/hop/<sha256>`, which redirects again (302) to
        the bytes' URL."""
        self.cdn_cache_control: str | None = None
        """The Cache-Control of the CDN's 200s (the real CDN's say a week, immutable)."""
        self.pause: Answer | None = None
        """The CDN's next plain GET of an LFS file: sent as this Answer's `pause_after` says
        (its body and headers filled in), then cleared."""
        self.cdn = Site(self._cdn)
        self.hub = Site(self._hub)

    def _hub(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        prefix = f"/{self.repo}/resolve/"
        if not path.startswith(prefix):
            return Answer(404, b"not found\n")
        if self.token is not None and headers.get("authorization") != f"Bearer {self.token}":
            return Answer(
                401, b"access to this repo is restricted\n", {"X-Error-Code": "GatedRepo"}
            )
        revision, _, name = path[len(prefix) :].partition("/")
        if revision not in ("main", COMMIT, self.commit):
            return Answer(404, b"revision not found\n")
        if name == "config.json":
            etag = hashlib.sha1(self.regular).hexdigest()
            return Answer(
                200,
                self.regular,
                {"X-Repo-Commit": self.commit, "ETag": f'"{etag}"', "Content-Type": "text/plain"},
            )
        data = self.big if name == "big.bin" else self.lfs.get(name)
        if data is None:
            return Answer(404, b"entry not found\n", {"X-Error-Code": "EntryNotFound"})
        digest = sha256(data)
        extra = {
            "X-Repo-Commit": self.commit,
            "X-Linked-Etag": f'"{digest}"',
            "X-Linked-Size": str(len(data)),
            "ETag": '"redirect-etag"',
            "Location": f"{self.cdn.url}/{'hop' if self.hop else 'repos'}/{digest}?sig=abc",
        }
        if name == "xet.bin":
            # A Xet-backed file answered by the Hub itself, with the headers that switch
            # huggingface_hub to Xet storage.
            extra.pop("Location")
            extra["Content-Type"] = "application/octet-stream"
            extra["X-Xet-Hash"] = "f" * 64
            extra["X-Xet-Refresh-Route"] = f"/api/models/{self.repo}/xet-read-token/{COMMIT}"
            extra["Link"] = (
                f'<{self.hub.url}/api/models/{self.repo}/xet-read-token/{COMMIT}>; rel="xet-auth",'
                f' <{self.hub.url}/api/next>; rel="next"'
            )
        if name == "xet.bin":
            return Answer(200, data, extra)
        return Answer(302, b"", extra)

    def _cdn(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if path.startswith("/hop/"):
            return Answer(302, b"", {"Location": "/repos/" + path.removeprefix("/hop/")})
        digest = path.removeprefix("/repos/").split("?")[0]
        if digest in self.tampered:
            bad = self.tampered[digest]
            if "range" in headers:
                first, _, last = headers["range"].removeprefix("bytes=").partition("-")
                piece = bad[int(first) : int(last) + 1]
                return Answer(
                    206,
                    piece,
                    {
                        "ETag": f'"cdn-{digest[:8]}"',
                        "Content-Range": f"bytes {first}-{int(first) + len(piece) - 1}/{len(bad)}",
                    },
                )
            return Answer(200, bad, {"Content-Type": "application/octet-stream"})
        for data in [*self.lfs.values(), self.big]:
            if sha256(data) != digest:
                continue
            if "range" in headers:
                start = int(headers["range"].removeprefix("bytes=").split("-")[0])
                return Answer(
                    206,
                    data[start:],
                    {
                        "ETag": f'"cdn-{digest[:8]}"',
                        "Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}",
                    },
                )
            if self.pause is not None and method == "GET" and data is not self.big:
                answer, self.pause = self.pause, None
                answer.body = data
                answer.headers = {"ETag": f'"cdn-{digest[:8]}"'}
                return answer
            if data is self.big and not self.cut_first.reached.is_set():
                answer = self.cut_first
                answer.body = data
                answer.headers = {"ETag": f'"cdn-{digest[:8]}"'}
                return answer
            cdn_headers = {
                "ETag": f'"cdn-{digest[:8]}"',
                "Content-Type": "application/octet-stream",
            }
            if self.cdn_cache_control is not None:
                cdn_headers["Cache-Control"] = self.cdn_cache_control
            return Answer(200, data, cdn_headers)
        return Answer(404, b"not found\n")


# --- npm ----------------------------------------------------------------------------------


def make_npm_tarball(name: str, version: str) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tf:
        for path, data in {
            "package/package.json": json.dumps({"name": name, "version": version}).encode(),
            "package/index.js": b"module.exports = 42;\n",
        }.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


class Npm(LoopbackServer):
    """The npm registry: packument at /<name> (/@scope%2fname for a scoped one; tarball URL
    absolute, `integrity` sha512) and the tarball at /<name>/-/<name>-<version>.tgz, on one
    site."""

    def __init__(self, name: str = "tinynpm", version: str = "1.0.0") -> None:
        self.name = name
        self.version = version
        self.tarball = make_npm_tarball(name, version)
        self.site = Site(self._handle)

    @property
    def tarball_path(self) -> str:
        """npm's layout: a scoped `@scope/name` keeps its slash here, the file is `name-v.tgz`."""
        return f"/{self.name}/-/{self.name.rsplit('/', 1)[-1]}-{self.version}.tgz"

    def _handle(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        tgz = self.tarball_path
        if path == tgz:
            return Answer(
                200,
                self.tarball,
                {
                    "Content-Type": "application/octet-stream",
                    "Cache-Control": "public, immutable, max-age=31557600",
                    "ETag": f'"{hashlib.sha1(self.tarball).hexdigest()}"',
                },
            )
        # npm asks for a scoped packument with its slash encoded: /@scope%2fname.
        if path.lower() != "/" + self.name.replace("/", "%2f"):
            return Answer(404, b'{"error":"not found"}')
        integrity = "sha512-" + base64.b64encode(hashlib.sha512(self.tarball).digest()).decode()
        packument = {
            "name": self.name,
            "dist-tags": {"latest": self.version},
            "versions": {
                self.version: {
                    "name": self.name,
                    "version": self.version,
                    "dist": {
                        "tarball": self.site.url + tgz,
                        "integrity": integrity,
                        "shasum": hashlib.sha1(self.tarball).hexdigest(),
                    },
                }
            },
        }
        return Answer(
            200,
            json.dumps(packument).encode(),
            {
                "Content-Type": "application/json",
                "ETag": '"pk-1"',
                "Cache-Control": "public, max-age=300",
                "Vary": "Accept-Encoding, Accept",
            },
        )
