"""Real upstream registries for the OCI tests: Debian's `docker-registry` (CNCF distribution
2.8) on loopback, anonymous, behind token auth, or in proxy mode, and the token issuer it
trusts.

    with TokenIssuer(users={"puller": "secret"}) as issuer, \
            Registry(tmp / "reg", auth=issuer) as registry:
        push_layout(layout.path, "v1", registry.host, "small", creds=("puller", "secret"))

Each registry is a `docker-registry serve <config.yml>` child process with its storage,
config and log in its own directory, on a free loopback port; `stop()` (or leaving the `with`)
terminates it and waits. Nothing outside that directory is touched.

Token auth (https://distribution.github.io/distribution/spec/auth/token/): the registry
answers 401 with `WWW-Authenticate: Bearer realm=<issuer>/token,service=...,scope=...`; the
issuer hands out an RS256 JWT whose header carries the signing certificate (`x5c`), and the
registry checks that chain against `rootcertbundle`, the issuer's self-signed certificate.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import http.server
import itertools
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from tests.harness import wait_until
from tests.loopback import LoopbackServer

REGISTRY = shutil.which("docker-registry")
SKOPEO = shutil.which("skopeo")
SERVICE = "relay-tests-registry"
ISSUER = "relay-tests-issuer"
MAX_TOKEN_REQUESTS = 10_000


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 15) -> None:
    """SIGTERM a child, wait for it (bounded), SIGKILL it if it lingers."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    """One request the issuer answered (or refused)."""

    authorization: str | None
    account: str | None
    """The user the Basic credentials named and proved (None: anonymous or refused)."""
    service: str
    scopes: tuple[str, ...]
    status: int


class TokenIssuer(LoopbackServer):
    """A token server (`GET /token`) the registry trusts; records every request.

    `users`: Basic credentials it accepts; they get pull and push. Anonymous requests get
    pull when `anonymous_pull`, wrong credentials a 401. Tokens live `expires_in` seconds."""

    def __init__(
        self,
        workdir: Path,
        *,
        users: dict[str, str] | None = None,
        anonymous_pull: bool = False,
        expires_in: int = 300,
    ) -> None:
        self.workdir = workdir
        self.users = dict(users or {})
        self.anonymous_pull = anonymous_pull
        self.expires_in = expires_in
        self.port = 0
        self.bundle = workdir / "issuer.pem"
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count(1)
        self._key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return self.url + "/token"

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()

    def token(self, account: str, scopes: list[str]) -> str:
        """A signed JWT granting `scopes` (pull, and push for a known user)."""
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            allowed = [a for a in actions.split(",") if a == "pull" or account in self.users]
            access.append({"type": kind, "name": name, "actions": allowed})
        now = int(time.time())
        header = {
            "typ": "JWT",
            "alg": "RS256",
            "x5c": [base64.b64encode(self._cert.public_bytes(serialization.Encoding.DER)).decode()],
        }
        claims = {
            "iss": ISSUER,
            "sub": account,
            "aud": SERVICE,
            "exp": now + self.expires_in,
            "nbf": now - 10,
            "iat": now,
            "jti": f"t{next(self._ids)}",
            "access": access,
        }
        signing_input = (
            _b64url(json.dumps(header).encode()) + "." + _b64url(json.dumps(claims).encode())
        )
        signature = self._key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return signing_input + "." + _b64url(signature)

    def _answer(self, path: str, authorization: str | None) -> tuple[int, dict[str, Any]]:
        split = urlsplit(path)
        query = parse_qs(split.query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
        account: str | None = None
        status = 200
        if split.path != "/token":
            status = 404
        elif authorization is not None:
            user, password = "", ""
            if authorization.startswith("Basic "):
                decoded = base64.b64decode(authorization[6:]).decode(errors="replace")
                user, _, password = decoded.partition(":")
            if user in self.users and self.users[user] == password:
                account = user
            else:
                status = 401
        elif not self.anonymous_pull:
            status = 401
        with self._lock:
            if len(self._requests) < MAX_TOKEN_REQUESTS:
                self._requests.append(
                    TokenRequest(
                        authorization,
                        account,
                        query.get("service", [""])[0],
                        tuple(scopes),
                        status,
                    )
                )
        if status != 200:
            return status, {"errors": [{"code": "UNAUTHORIZED", "message": "no token"}]}
        token = self.token(account or "", scopes)
        issued = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return 200, {
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in,
            "issued_at": issued,
        }

    def start(self) -> TokenIssuer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.bundle.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                status, body = issuer._answer(self.path, self.headers.get("Authorization"))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        LoopbackServer.started()
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="oci-token-issuer", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None or self._thread is None:
            return
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        self._server = None

    def __enter__(self) -> TokenIssuer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Registry(LoopbackServer):
    """`docker-registry serve` on a free loopback port, storage under `workdir`.

    `auth`: the token issuer it trusts (else anonymous); `proxy_remote`: run as a pull-through
    cache of that registry URL (distribution's proxy mode)."""

    def __init__(
        self,
        workdir: Path,
        *,
        auth: TokenIssuer | None = None,
        proxy_remote: str | None = None,
        storage: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.auth = auth
        self.proxy_remote = proxy_remote
        self.storage = storage if storage is not None else workdir / "storage"
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def config(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: error",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.storage}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: 127.0.0.1:{self.port}",
            f"  secret: relay-tests-{self.port}",
        ]
        if self.auth is not None:
            lines += [
                "auth:",
                "  token:",
                f"    realm: {self.auth.realm}",
                f"    service: {SERVICE}",
                f"    issuer: {ISSUER}",
                f"    rootcertbundle: {self.auth.bundle}",
            ]
        if self.proxy_remote is not None:
            lines += ["proxy:", f"  remoteurl: {self.proxy_remote}"]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        assert REGISTRY is not None, "docker-registry is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.storage.mkdir(parents=True, exist_ok=True)
        for _attempt in range(3):  # the free port may be taken before the registry binds it
            self.port = free_port()
            config = self.workdir / "config.yml"
            config.write_text(self.config())
            self._log = (self.workdir / "registry.log").open("ab")
            env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.workdir)}
            self._proc = subprocess.Popen(
                [REGISTRY, "serve", str(config)],
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
            LoopbackServer.started()
            if wait_until(self._answers, timeout=15):
                return self
            self.stop()
        log = (self.workdir / "registry.log").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"docker-registry did not start:\n{log}")

    def _answers(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return True  # exited: stop waiting (start() sees it)
        try:
            return httpx.get(self.url + "/v2/", timeout=1).status_code in (200, 401)
        except httpx.HTTPError:
            return False

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        try:
            if proc is not None:
                stop_process(proc)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> Registry:
        started = self.start()
        if not started.running:
            self.stop()
            raise RuntimeError("docker-registry exited at start")
        return started

    def __exit__(self, *exc: object) -> None:
        self.stop()


def skopeo_env(workdir: Path) -> dict[str, str]:
    """An environment for skopeo/podman that reads and writes nothing global: its own HOME,
    XDG directories and registries.conf (the caller may rewrite it), the default policy."""
    for sub in ("config", "data", "run", "cache", "tmp"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    registries = workdir / "registries.conf"
    if not registries.exists():
        registries.write_text("unqualified-search-registries = []\n")
    containers = workdir / "containers.conf"
    if not containers.exists():
        containers.write_text("[engine]\n")
    auth = workdir / "auth.json"
    if not auth.exists():
        auth.write_text('{"auths": {}}\n')
    policy = workdir / "policy.json"
    policy.write_text('{"default": [{"type": "insecureAcceptAnything"}]}\n')
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "XDG_CONFIG_HOME": str(workdir / "config"),
        "XDG_DATA_HOME": str(workdir / "data"),
        "XDG_RUNTIME_DIR": str(workdir / "run"),
        "XDG_CACHE_HOME": str(workdir / "cache"),
        "TMPDIR": str(workdir / "tmp"),
        "CONTAINERS_REGISTRIES_CONF": str(registries),
        "CONTAINERS_CONF": str(containers),
        "REGISTRY_AUTH_FILE": str(auth),
    }


def push_layout(
    layout: Path,
    tag: str,
    registry_host: str,
    name: str,
    *,
    dest_tag: str | None = None,
    creds: tuple[str, str] | None = None,
    workdir: Path,
    timeout: float = 300,
) -> None:
    """`skopeo copy --all oci:<layout>:<tag> docker://<registry_host>/<name>:<dest_tag>`."""
    assert SKOPEO is not None, "skopeo is not installed"
    env = skopeo_env(workdir)
    args = [
        SKOPEO,
        "--policy",
        str(workdir / "policy.json"),
        "copy",
        "--all",
        "--quiet",
        "--dest-tls-verify=false",
        "--preserve-digests",
    ]
    if creds is not None:
        args += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    args += [f"oci:{layout}:{tag}", f"docker://{registry_host}/{name}:{dest_tag or tag}"]
    proc = subprocess.run(args, env=env, capture_output=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"skopeo push failed: {proc.stderr.decode(errors='replace')[-2000:]}")
