"""A fake upstream registry for `httpx.MockTransport`: the distribution API's pulls
(manifests by tag and digest, GET and HEAD; blobs, with ranges; tags lists), a token realm
that the registry trusts, blobs redirected to object storage, and switches for faults (a
status for every manifest request, a tampered blob, a Basic challenge). Every request it gets
is recorded."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def digest_of(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


class _Chunks(httpx.AsyncByteStream):
    def __init__(self, body: bytes, size: int = 65536, cut_after: int | None = None) -> None:
        self._body = body
        self._size = size
        self._cut_after = cut_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        cut = self._cut_after
        for start in range(0, len(self._body), self._size):
            if cut is not None and start >= cut:
                raise httpx.ReadError("connection reset by the fake registry")
            yield self._body[start : start + self._size]


@dataclass
class FakeRegistry:
    host: str = "registry.test"
    realm: str = "https://auth.test/token"
    auth: str = "bearer"
    """"bearer" (a token from the realm), "basic" (user:pass), or "" (anonymous)."""
    expires_in: int = 300
    storage: str = ""
    """A host blobs are redirected to (307), "" to serve them from the registry."""
    manifest_status: int | None = None
    """Answer every manifest request with this status (429, 503...)."""
    tampered: dict[str, bytes] = field(default_factory=dict)
    """digest -> the bytes served instead of the blob's own."""
    tampered_ranges: dict[str, bytes] = field(default_factory=dict)
    """digest -> the bytes a range of the blob is served from instead of its own."""
    cut_once: dict[str, int] = field(default_factory=dict)
    """digest -> the next whole GET of the blob is cut (a read error) after about this
    many bytes (whole chunks)."""
    accept_ranges: bool = True
    """Whether blob answers say `Accept-Ranges: bytes`."""
    etag: bool = False
    """Whether blob answers carry the digest as a strong ETag (as distribution's do)."""
    minted: int = 0
    """Tokens the realm issued (each named by its count: tok-1, tok-2...)."""
    token_prefix: str = "tok"
    """What this registry's tokens start with (two registries' tokens told apart)."""
    down: bool = False
    """Refuse every connection (registry, realm and storage alike)."""
    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    tags: dict[tuple[str, str], str] = field(default_factory=dict)
    seen: list[httpx.Request] = field(default_factory=list)
    issued: set[str] = field(default_factory=set)

    # ---- content --------------------------------------------------------------------------

    def add_blob(self, body: bytes) -> str:
        digest = digest_of(body)
        self.blobs[digest] = body
        return digest

    def add_image(self, name: str, tag: str, layer: bytes) -> tuple[str, str]:
        """An image (one layer) tagged `tag`: (manifest digest, layer digest)."""
        layer_digest = self.add_blob(layer)
        config = self.add_blob(b'{"architecture":"amd64"}')
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MANIFEST,
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": config,
                    "size": 24,
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest,
                        "size": len(layer),
                    }
                ],
            }
        ).encode()
        return self.tag(name, tag, MANIFEST, manifest), layer_digest

    def tag(self, name: str, tag: str, media_type: str, body: bytes) -> str:
        digest = digest_of(body)
        self.manifests[digest] = (media_type, body)
        self.tags[(name, tag)] = digest
        return digest

    # ---- what it saw ------------------------------------------------------------------------

    def requests(
        self, method: str | None = None, *, host: str | None = None, part: str = ""
    ) -> list[httpx.Request]:
        return [
            r
            for r in self.seen
            if (method is None or r.method == method)
            and (host is None or r.url.host == host)
            and part in r.url.path
        ]

    # ---- the transport ----------------------------------------------------------------------

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        """Every answer streamed, as from a socket (a `content=` answer would come read)."""
        response = self._answer(request)
        if isinstance(response.stream, _Chunks):
            return response
        return httpx.Response(
            response.status_code, headers=response.headers, stream=_Chunks(response.content)
        )

    def serves(self, host: str) -> bool:
        """Whether requests to `host` are this registry's (its own, its realm's, storage's)."""
        return host in (self.host, httpx.URL(self.realm).host, self.storage)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.down:
            raise httpx.ConnectError("connection refused by the fake registry", request=request)
        if request.url.host == "auth.test" or request.url.path == "/token":
            return self._token(request)
        if self.storage and request.url.host == self.storage:
            return self._blob(request, request.url.path.rpartition("/")[2])
        refused = self._refused(request)
        if refused is not None:
            return refused
        path = request.url.path
        if path == "/v2/":
            return httpx.Response(200, json={})
        head, _, rest = path.removeprefix("/v2/").rpartition("/")
        name, _, kind = head.rpartition("/")
        if kind == "manifests":
            return self._manifest(request, name, rest)
        if kind == "blobs":
            if self.storage and rest in self.blobs:
                return httpx.Response(
                    307, headers={"location": f"https://{self.storage}/data/{rest}?sig=x"}
                )
            return self._blob(request, rest)
        if path.endswith("/tags/list"):
            name = path.removeprefix("/v2/").removesuffix("/tags/list")
            tags = sorted(t for (n, t) in self.tags if n == name)
            headers = (
                {"link": f'</v2/{name}/tags/list?n=1&last={tags[0]}>; rel="next"'} if tags else {}
            )
            return httpx.Response(200, json={"name": name, "tags": tags[:1]}, headers=headers)
        return _error(404, "NAME_UNKNOWN")

    def _refused(self, request: httpx.Request) -> httpx.Response | None:
        given = request.headers.get("authorization", "")
        if self.auth == "bearer":
            if given.removeprefix("Bearer ") in self.issued:
                return None
            scope = ""
            parts = request.url.path.removeprefix("/v2/").rsplit("/", 2)
            if len(parts) == 3:
                scope = f',scope="repository:{parts[0]}:pull"'
            challenge = f'Bearer realm="{self.realm}",service="{self.host}"{scope}'
            return _error(401, "UNAUTHORIZED", {"www-authenticate": challenge})
        if self.auth == "basic":
            if given == "Basic dXNlcjpwYXNz":  # user:pass
                return None
            return _error(401, "UNAUTHORIZED", {"www-authenticate": 'Basic realm="registry"'})
        return None

    def _token(self, request: httpx.Request) -> httpx.Response:
        self.minted += 1
        token = f"{self.token_prefix}-{self.minted}"
        self.issued.add(token)
        return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})

    def _manifest(self, request: httpx.Request, name: str, reference: str) -> httpx.Response:
        if self.manifest_status is not None:
            return _error(self.manifest_status, "UNAVAILABLE")
        if not any(n == name for n, _ in self.tags):
            return _error(404, "NAME_UNKNOWN")
        digest = reference if reference.startswith("sha256:") else self.tags.get((name, reference))
        if digest is None or digest not in self.manifests:
            return _error(404, "MANIFEST_UNKNOWN")
        media_type, body = self.manifests[digest]
        headers = {
            "content-type": media_type,
            "docker-content-digest": digest,
            "etag": f'"{digest}"',
        }
        if request.method == "HEAD":
            headers["content-length"] = str(len(body))
            return httpx.Response(200, headers=headers)
        return httpx.Response(200, headers=headers, content=body)

    def _blob(self, request: httpx.Request, digest: str) -> httpx.Response:
        if digest not in self.blobs:
            return _error(404, "BLOB_UNKNOWN")
        body = self.tampered.get(digest, self.blobs[digest])
        headers = {"content-type": "application/octet-stream", "x-amz-request-id": "r1"}
        if self.accept_ranges:
            headers["accept-ranges"] = "bytes"
        if self.etag:
            headers["etag"] = f'"{digest}"'
        asked = request.headers.get("range", "").removeprefix("bytes=")
        if asked:
            body = self.tampered_ranges.get(digest, body)
            first, _, last = asked.partition("-")
            start, stop = int(first), min(int(last) + 1 if last else len(body), len(body))
            headers["content-range"] = f"bytes {start}-{stop - 1}/{len(body)}"
            headers["content-length"] = str(stop - start)
            return httpx.Response(206, headers=headers, stream=_Chunks(body[start:stop]))
        headers["content-length"] = str(len(body))
        if request.method == "HEAD":
            return httpx.Response(200, headers=headers)
        cut = self.cut_once.pop(digest, None)
        return httpx.Response(200, headers=headers, stream=_Chunks(body, cut_after=cut))


def _error(status: int, code: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.Response(
        status, json={"errors": [{"code": code, "message": code.lower()}]}, headers=headers
    )
