"""Fuzz tier, client side: generated request heads sent as raw bytes to a real relay.

Whatever arrives, relay answers without a 500 or a traceback, never shows a secret (route
credential, client secret, signing key), never sends the origin a path outside the route's
base, refuses what RFC 9112 says to refuse, and settles clean after every example (no
stream slot, upstream connection or task held, no unhandled exception logged).
"""

from __future__ import annotations

import posixpath
import re
import socket
from collections.abc import Iterator
from urllib.parse import unquote_to_bytes

import pytest
from hypothesis import given, reject, settings

from relay.config import Route
from tests.fuzz.strategies import INCLUDE_KNOWN, SECRET_HEADER, RequestInput, requests, scaled
from tests.fuzz.wire import GENERIC_5XX_BODY, read_response
from tests.harness import RelayThread, relay_config, running_relay
from tests.origin import Origin

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]

CREDENTIAL = "Bearer fuzz-route-credential-5e1f0c"
CLIENT_SECRET = "fuzz-client-secret-9b2d77"
SIGNING_KEY = "fuzz-signing-key-c4a1e3"
SECRETS = (b"fuzz-route-credential-5e1f0c", CLIENT_SECRET.encode(), SIGNING_KEY.encode())

# Route prefix -> the path the origin must stay under.
BASES = {b"/o/": b"/", b"/b/": b"/base/", b"/c/": b"/cbase/", b"/r/": b"/v2/", b"/v2/": b"/v2/"}

# Input classes that fail today, keyed to the finding being fixed on another branch. They are
# not sent (RELAY_FUZZ_KNOWN=1 sends them); the lead removes an entry once its fix is merged.
# (Issue 9's five classes are fixed and generated again.)
KNOWN: dict[str, str] = {}


def known_findings(request: RequestInput) -> list[str]:
    """The KNOWN classes this request belongs to."""
    found: list[str] = []
    assert all(name in KNOWN for name in found)
    return found


@pytest.fixture(scope="module")
def fuzz_origin() -> Iterator[Origin]:
    with Origin() as origin:
        yield origin


@pytest.fixture(scope="module")
def fuzz_relay(fuzz_origin: Origin) -> Iterator[RelayThread]:
    routes = (
        Route(prefix="/o/", upstream=fuzz_origin.url + "/", allow_private=True),
        Route(prefix="/b/", upstream=fuzz_origin.url + "/base/", allow_private=True),
        Route(
            prefix="/c/",
            upstream=fuzz_origin.url + "/cbase/",
            allow_private=True,
            credential=CREDENTIAL,
        ),
        # A registry mirror (`preset = "oci"`): `/v2/...` and `/r/v2/...` reach relay/registry.
        Route(
            prefix="/r/",
            upstream=fuzz_origin.url + "/",
            preset="oci",
            allow_private=True,
            registry_hosts=("fuzz.test",),
            registry_default=True,
            redirect_hosts=("127.0.0.1",),
        ),
    )
    config = relay_config(
        fuzz_origin.url,
        routes=routes,
        client_secret=CLIENT_SECRET,
        signing_key=SIGNING_KEY,
        read_timeout=2.0,
        header_timeout=1.0,
        keepalive_timeout=1.0,
    )
    with running_relay(config) as relay:
        yield relay


_OVERLONG_DOT = re.compile(rb"\xc0\xae|\xe0\x80\xae|\xef\xbc\x8e")
_OVERLONG_SLASH = re.compile(rb"\xc0\xaf|\xe0\x80\xaf|\xef\xbc\x8f")


def as_an_origin_might_read(target: bytes) -> bytes:
    """The path the origin could resolve the target to, decoding as leniently as servers
    have: percent-escapes (repeatedly), overlong and fullwidth dots and slashes, backslashes,
    `;` parameters, dot segments."""
    path = target.split(b"?", 1)[0]
    for _ in range(3):
        path = unquote_to_bytes(path)
    path = _OVERLONG_DOT.sub(b".", path)
    path = _OVERLONG_SLASH.sub(b"/", path).replace(b"\\", b"/")
    path = b"/".join(segment.split(b";", 1)[0] for segment in path.split(b"/"))
    normal = posixpath.normpath(path)
    return normal + b"/" if not normal.endswith(b"/") else normal


def host_fields(request: RequestInput) -> int:
    return sum(1 for name, _ in request.headers if name.lower() == b"host")


def has_body(request: RequestInput) -> bool:
    """A body announced by Content-Length > 0 or by Transfer-Encoding."""
    for name, value in request.headers:
        if name.lower() == b"transfer-encoding":
            return True
        if name.lower() == b"content-length" and value.strip() not in (b"0", b""):
            return True
    return False


def request_is_otherwise_valid(request: RequestInput) -> bool:
    """Nothing else in the request gets a 4xx first: HTTP/1.1, one Host, the client secret,
    a routed target, and only the generated body's own framing header."""
    framing = {b"content-length", b"transfer-encoding"}
    own = sum(1 for name, _ in request.headers if name.lower() in framing)
    return (
        request.version == b"HTTP/1.1"
        and host_fields(request) == 1
        and (SECRET_HEADER, CLIENT_SECRET.encode()) in request.headers
        and request.target.startswith((b"/o/", b"/b/", b"/c/"))
        and own == 1
        and all(b >= 0x20 and b != 0x7F for _, v in request.headers for b in v.replace(b"\t", b""))
    )


def check(relay: RelayThread, origin: Origin, request: RequestInput) -> None:
    findings = known_findings(request)
    if findings and not INCLUDE_KNOWN:
        reject()
    origin.reset_stats()
    with socket.create_connection(("127.0.0.1", relay.port), timeout=3) as sock:
        sock.sendall(request.raw)
        response = read_response(sock, head_request=request.method == b"HEAD")
    problems = []
    if response.status == 500:
        problems.append("answered 500")
    if b"Traceback" in response.raw:
        problems.append("a traceback in the response")
    relay_made = not response.header(b"via")  # a relayed response carries relay's Via
    if response.status >= 500 and relay_made and not GENERIC_5XX_BODY.fullmatch(response.body):
        problems.append(f"a {response.status} body that is not relay's own words")
    problems.extend(f"secret {s!r} in the response" for s in SECRETS if s in response.raw)
    base = next((b for p, b in BASES.items() if request.target.startswith(p)), None)
    for seen in origin.requests:
        target = seen.target.encode("latin-1")
        if base is not None and not as_an_origin_might_read(target).startswith(base):
            problems.append(f"the origin saw {target!r}, outside {base!r}")
    accepted = 200 <= response.status < 400
    if accepted and request.version == b"HTTP/1.1" and host_fields(request) != 1:
        problems.append(f"accepted an HTTP/1.1 request with {host_fields(request)} Host fields")
    if (
        accepted
        and request.version == b"HTTP/1.0"
        and any(name.lower() == b"transfer-encoding" for name, _ in request.headers)
    ):
        problems.append("accepted an HTTP/1.0 request with Transfer-Encoding")
    if request.method in (b"GET", b"HEAD") and has_body(request):
        # RFC 9110 9.3.1: a GET/HEAD body has no meaning; relay refuses it (issue 9 item 4).
        if accepted:
            problems.append(f"accepted a {request.method.decode()} with a body")
        elif request_is_otherwise_valid(request) and response.status != 400:
            problems.append(f"a {request.method.decode()} with a body got {response.status}")
    problems.extend(relay.invariant_violations(timeout=3.0))
    if problems:
        raise AssertionError(
            f"{'; '.join(problems)}\nrequest: {request.raw!r}\n"
            f"response: {response.raw[:600]!r}\nknown findings: {findings}"
        )


@settings(max_examples=scaled(0.8))
@given(request=requests(secret=CLIENT_SECRET.encode()))
def test_fuzz_requests(fuzz_relay: RelayThread, fuzz_origin: Origin, request: RequestInput) -> None:
    """Generated request heads sent as raw bytes."""
    check(fuzz_relay, fuzz_origin, request)


@settings(max_examples=scaled(0.3))
@given(request=requests(secret=CLIENT_SECRET.encode(), registry=True))
def test_fuzz_registry_requests(
    fuzz_relay: RelayThread, fuzz_origin: Origin, request: RequestInput
) -> None:
    """Generated request heads whose targets are the registry mirror's (names, references,
    digests, `ns=`), against an upstream that does not speak the registry API."""
    check(fuzz_relay, fuzz_origin, request)
