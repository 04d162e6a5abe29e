"""A tiny registry on loopback for end-to-end tests of the oci preset: the distribution API's
pulls (manifests by tag and digest, blobs with ranges), a token realm the registry trusts,
blobs redirected (307) to an object-storage host, and the faults relay must survive (a layer
cut mid-body once, tampered bytes, 429s, a stopped registry).

Three `Site`s (tests/ecosystems.py): the registry, its token realm and its object storage,
each refusing requests that did not come through relay and recording what they got.
"""

from __future__ import annotations

import hashlib
import json
import threading
from types import TracebackType

from tests.ecosystems import Answer, Site
from tests.loopback import LoopbackServer

MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class FakeRegistry(LoopbackServer):
    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}
        self.manifests: dict[str, bytes] = {}
        self.tags: dict[tuple[str, str], str] = {}
        self.tampered: dict[str, bytes] = {}
        self.cut_once: set[str] = set()
        """Digests whose next storage GET sends half the body, then closes."""
        self.tampered_ranges: dict[str, bytes] = {}
        """Digests whose ranges are served from these bytes instead of the blob's."""
        self.validators = True
        """Whether object storage sends an ETag and `Accept-Ranges` (many send neither)."""
        self.status: int | None = None
        """Answer every manifest request with this status."""
        self.issued: set[str] = set()
        self.minted = 0
        """Tokens the realm issued (named by their count: tok-1, tok-2...)."""
        self._lock = threading.Lock()
        self.registry = Site(self._registry)
        self.realm = Site(self._realm)
        self.storage = Site(self._storage)

    # ---- content ----------------------------------------------------------------------------

    def add_image(self, name: str, tag: str, layer: bytes) -> tuple[str, str]:
        layer_digest = digest_of(layer)
        self.blobs[layer_digest] = layer
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "layers": [{"digest": layer_digest, "size": len(layer)}],
            }
        ).encode()
        digest = digest_of(manifest)
        self.manifests[digest] = manifest
        self.tags[(name, tag)] = digest
        return digest, layer_digest

    def storage_gets(self, digest: str) -> int:
        return sum(1 for m, p, _ in self.storage.requests if m == "GET" and digest in p)

    # ---- sites ------------------------------------------------------------------------------

    def _realm(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        with self._lock:
            self.minted += 1
            token = f"tok-{self.minted}"
            self.issued.add(token)
        return Answer(200, json.dumps({"token": token, "expires_in": 300}).encode())

    def _registry(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        if headers.get("authorization", "").removeprefix("Bearer ") not in self.issued:
            challenge = f'Bearer realm="{self.realm.url}/token",service="fake"'
            return _error(401, "UNAUTHORIZED", {"WWW-Authenticate": challenge})
        path = path.split("?")[0]
        if path == "/v2/":
            return Answer(200, b"{}")
        head, _, reference = path.removeprefix("/v2/").rpartition("/")
        name, _, kind = head.rpartition("/")
        if kind == "manifests":
            if self.status is not None:
                return _error(self.status, "TOOMANYREQUESTS", {"Retry-After": "1"})
            digest = (
                reference if reference.startswith("sha256:") else self.tags.get((name, reference))
            )
            body = self.manifests.get(digest or "")
            if digest is None or body is None:
                return _error(404, "MANIFEST_UNKNOWN")
            return Answer(
                200,
                body,
                {"Content-Type": MANIFEST, "Docker-Content-Digest": digest},
            )
        if kind == "blobs" and reference in self.blobs:
            return Answer(307, b"", {"Location": f"{self.storage.url}/data/{reference}?sig=1"})
        return _error(404, "BLOB_UNKNOWN")

    def _storage(self, method: str, path: str, headers: dict[str, str]) -> Answer:
        digest = path.split("?")[0].removeprefix("/data/")
        body = self.tampered.get(digest, self.blobs.get(digest))
        if body is None:
            return Answer(404, b"no such key\n")
        etag = {"Content-Type": "application/octet-stream"}
        if self.validators:
            etag |= {"ETag": f'"{digest[7:23]}"', "Accept-Ranges": "bytes"}
        if "range" in headers:
            body = self.tampered_ranges.get(digest, body)
            first, _, last = headers["range"].removeprefix("bytes=").partition("-")
            start, end = int(first), min(int(last or len(body) - 1), len(body) - 1)
            return Answer(
                206,
                body[start : end + 1],
                {**etag, "Content-Range": f"bytes {start}-{end}/{len(body)}"},
            )
        if method == "GET" and digest in self.cut_once:
            self.cut_once.discard(digest)
            answer = Answer(
                200, body, {**etag, "Content-Length": str(len(body))}, hold_after=len(body) // 2
            )
            answer.release.set()
            return answer
        return Answer(200, body, etag)

    def __enter__(self) -> FakeRegistry:
        self.registry.__enter__()
        self.realm.__enter__()
        self.storage.__enter__()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        for site in (self.storage, self.realm, self.registry):
            site.__exit__(t, e, tb)


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> Answer:
    body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
    return Answer(status, body, {"Content-Type": "application/json", **(headers or {})})
