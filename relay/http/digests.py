"""The SHA-256 an upstream announces for the whole object, from its response headers.

Three spellings are understood, each describing the whole representation (so they hold for a
206 too, unlike `Content-Digest`, which describes only the bytes of that message):

- `Repr-Digest: sha-256=:BASE64:` (RFC 9530, a structured-field dictionary)
- `Digest: SHA-256=BASE64` (RFC 3230, obsoleted by RFC 9530 but still sent)
- `x-amz-checksum-sha256: BASE64` (S3 with checksum mode on; a multipart upload's composite
  checksum, spelled `BASE64-N` or flagged by `x-amz-checksum-type: COMPOSITE`, is a checksum
  of part checksums and is ignored)

A value that is not 32 bytes of valid base64 is ignored. Two headers that disagree make the
object unverifiable: `DigestConflict`.
"""

from __future__ import annotations

import base64
import binascii

import httpx


class DigestConflict(ValueError):
    pass


def upstream_sha256(headers: httpx.Headers) -> str | None:
    """The hex SHA-256 the upstream announces for the whole object, if any."""
    found = {
        digest
        for digest in (
            _repr_digest(headers.get_list("repr-digest", split_commas=True)),
            _rfc3230_digest(headers.get_list("digest", split_commas=True)),
            _amz_checksum(headers),
        )
        if digest is not None
    }
    if len(found) > 1:
        raise DigestConflict("the upstream's digest headers disagree: " + ", ".join(sorted(found)))
    return found.pop() if found else None


def _repr_digest(items: list[str]) -> str | None:
    for item in items:
        key, sep, value = item.strip().partition("=")
        value = value.split(";", 1)[0].strip()  # structured-field parameters
        if sep and key.strip() == "sha-256" and len(value) > 2 and value[0] == value[-1] == ":":
            return _b64_sha256(value[1:-1])
    return None


def _rfc3230_digest(items: list[str]) -> str | None:
    for item in items:
        key, sep, value = item.strip().partition("=")
        if sep and key.strip().lower() == "sha-256":
            return _b64_sha256(value.strip())
    return None


def _amz_checksum(headers: httpx.Headers) -> str | None:
    value = headers.get("x-amz-checksum-sha256")
    if value is None or headers.get("x-amz-checksum-type", "").upper() == "COMPOSITE":
        return None
    return _b64_sha256(value.strip())


def _b64_sha256(text: str) -> str | None:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def b64_of_hex(hex_digest: str) -> str:
    """The base64 spelling of a hex digest (as digest headers carry it)."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")
