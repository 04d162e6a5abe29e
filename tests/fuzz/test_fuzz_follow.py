"""Fuzz tier, what relay does on its own behalf: followed redirects and resumed bodies.

Redirects: a `redirects = "follow"` route with a credential gets generated `Location` values
(malformed, other ports, other schemes and hosts, credentials in the URL). Checked: never a
500, 5xx bodies are relay's own words, and the route's credential reaches only its own
origin (every request the scripted upstreams saw that carries it was for 127.0.0.1:<port>).

Resume: a body with a strong ETag cut by FIN or RST, then a generated continuation (206 with
the same or another validator, other totals and ranges, other bytes, or a 200). Checked: a
body that reaches the client complete is exactly the object's bytes, never a splice; a
correct continuation completes it.
"""

from __future__ import annotations

import dataclasses
import itertools
import socket
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import Route
from tests.fuzz.strategies import scaled
from tests.fuzz.wire import GENERIC_5XX_BODY, WireResponse, read_response
from tests.harness import RelayThread, relay_config, running_relay
from tests.scripted_upstream import Reply, ScriptedUpstream

pytestmark = [pytest.mark.e2e, pytest.mark.fuzz]

CREDENTIAL = "Bearer fuzz-follow-credential-71c0d2"
_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def main_upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def other_upstream() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def follow_relay(main_upstream: ScriptedUpstream) -> Iterator[RelayThread]:
    routes = (
        Route(
            prefix="/f/",
            upstream=main_upstream.url + "/base/",
            allow_private=True,
            redirects="follow",
            redirect_hosts=("127.0.0.1", "localhost"),
            max_redirects=3,
            credential=CREDENTIAL,
        ),
        Route(prefix="/r/", upstream=main_upstream.url + "/base/", allow_private=True),
    )
    config = relay_config(
        main_upstream.url,
        routes=routes,
        read_timeout=0.5,
        connect_timeout=1.0,
        resume_attempts=2,
    )
    with running_relay(config) as relay:
        yield relay


def get(relay: RelayThread, path: str) -> WireResponse:
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        return read_response(sock)


LOCATIONS = [
    "http://[::1",
    "http://h\\@127.0.0.1/",
    "",
    "http://",
    "://x",
    "ftp://127.0.0.1/x",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "//127.0.0.1:{other}/land",
    "http://127.0.0.1:{other}/land",
    "http://127.0.0.1:{other}/redirect-back",
    "https://127.0.0.1:{main}/base/land",
    "http://user:pw@127.0.0.1:{main}/base/land",
    "http://user@127.0.0.1:{other}/land",
    "http://127.0.0.1:{main}/base/land",
    "/base/land",
    "land",
    "../land",
    "http://localhost:{main}/base/land",
    "http://127.0.0.1:{main}@evil.example/x",
    "http://127.0.0.1:{main}/base/%ff",
    "http://127.0.0.1:99999/",
    "http://127.0.0.1:{main}/base/land#frag",
    "http://169.254.169.254/latest/meta-data/",
    "HTTP://127.0.0.1:{main}/base/land",
    "http://127.0.0.1:{main}/base/loop",
]


@st.composite
def redirects(draw: st.DrawFn) -> tuple[int, bytes]:
    status = draw(st.sampled_from([301, 302, 303, 307, 308]))
    plain = st.binary(max_size=24).map(lambda b: bytes(x for x in b if x not in b"\r\n"))
    location = draw(st.one_of(st.sampled_from(LOCATIONS).map(str.encode), plain))
    return status, location


def _land(upstream: ScriptedUpstream, path: str, body: bytes) -> None:
    upstream.script(
        path, Reply([b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)])
    )


@settings(max_examples=scaled(0.04))
@given(generated=redirects())
def test_fuzz_followed_redirects(
    follow_relay: RelayThread,
    main_upstream: ScriptedUpstream,
    other_upstream: ScriptedUpstream,
    generated: tuple[int, bytes],
) -> None:
    status, template = generated
    location = template.replace(b"{main}", str(main_upstream.port).encode()).replace(
        b"{other}", str(other_upstream.port).encode()
    )
    n = next(_numbers)
    main_upstream.script(
        f"/base/x{n}",
        Reply(
            [b"HTTP/1.1 %d Moved\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % (status, location)]
        ),
    )
    for upstream in (main_upstream, other_upstream):
        _land(upstream, "/base/land", b"landed")
        _land(upstream, "/land", b"landed elsewhere")
    other_upstream.script(
        "/redirect-back",
        Reply(
            [
                b"HTTP/1.1 302 Found\r\nLocation: %s/base/land\r\nContent-Length: 0\r\n\r\n"
                % main_upstream.url.encode()
            ]
        ),
    )
    main_upstream.script(
        "/base/loop",
        Reply([b"HTTP/1.1 302 Found\r\nLocation: /base/loop\r\nContent-Length: 0\r\n\r\n"]),
    )
    response = get(follow_relay, f"/f/x{n}")
    problems = []
    if response.status == 500 or b"Traceback" in response.raw:
        problems.append(f"answered {response.status}")
    relay_made = not response.header(b"via")
    if response.status >= 500 and relay_made and not GENERIC_5XX_BODY.fullmatch(response.body):
        problems.append(f"a {response.status} body that is not relay's own words")
    own_host = f"host: 127.0.0.1:{main_upstream.port}".encode()
    for upstream in (main_upstream, other_upstream):
        for seen in upstream.received:
            lower = seen.raw.lower()
            if CREDENTIAL.encode().lower() in lower and own_host not in lower:
                problems.append(f"the route credential went to {seen.raw[:200]!r}")
    problems.extend(follow_relay.invariant_violations(timeout=3.0))
    if problems:
        raise AssertionError(
            f"{'; '.join(problems)}\nLocation: {location!r} ({status})\n"
            f"client got: {response.raw[:400]!r}"
        )


@dataclasses.dataclass(frozen=True)
class Resume:
    size: int
    cut: int
    end: str  # how the first response ends: "fin" or "rst"
    status: int  # the continuation's status: 206 or 200
    etag: bytes  # b"" for none
    start: int
    total: int
    same_bytes: bool

    @property
    def correct(self) -> bool:
        return (self.status, self.etag, self.start, self.total, self.same_bytes) == (
            206,
            b'"v1"',
            self.cut,
            self.size,
            True,
        )


@st.composite
def resumes(draw: st.DrawFn) -> Resume:
    size = draw(st.integers(2, 4000))
    cut = draw(st.integers(1, size - 1))
    correct = draw(st.booleans())
    if correct:
        return Resume(
            size, cut, draw(st.sampled_from(["fin", "rst"])), 206, b'"v1"', cut, size, True
        )
    etag = draw(st.sampled_from([b'"v1"', b'"v2"', b'W/"v1"', b""]))
    start = draw(st.sampled_from([cut, cut - 1, cut + 1, 0]))
    total = draw(st.sampled_from([size, size + 1, size - 1]))
    status = draw(st.sampled_from([206, 206, 206, 200]))
    # The same validator with other bytes would be the upstream lying; not generated.
    same_bytes = etag == b'"v1"' or draw(st.booleans())
    return Resume(
        size, cut, draw(st.sampled_from(["fin", "rst"])), status, etag, start, total, same_bytes
    )


@settings(max_examples=scaled(0.04))
@given(generated=resumes())
def test_fuzz_resumed_bodies(
    follow_relay: RelayThread, main_upstream: ScriptedUpstream, generated: Resume
) -> None:
    g = generated
    n = next(_numbers)
    original = bytes((i * 7 + n) % 251 for i in range(g.size))
    other = bytes((i * 13 + n + 1) % 251 for i in range(g.size + 1))
    first = (
        b'HTTP/1.1 200 OK\r\nContent-Length: %d\r\nETag: "v1"\r\nAccept-Ranges: bytes\r\n\r\n'
        % g.size
    )
    source = original if g.same_bytes else other
    etag = b"ETag: %s\r\n" % g.etag if g.etag else b""
    if g.status == 206:
        rest = source[g.start : g.total]
        continuation = (
            b"HTTP/1.1 206 Partial Content\r\nContent-Range: bytes %d-%d/%d\r\n%s"
            b"Content-Length: %d\r\n\r\n%s"
            % (g.start, g.start + len(rest) - 1, g.total, etag, len(rest), rest)
        )
    else:
        continuation = b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (
            etag,
            g.size,
            source[: g.size],
        )
    main_upstream.script(
        f"/base/y{n}",
        Reply([first + original[: g.cut]], "rst" if g.end == "rst" else "fin"),
        Reply([continuation]),
    )
    response = get(follow_relay, f"/r/y{n}")
    problems = []
    if response.status == 500 or b"Traceback" in response.raw:
        problems.append(f"answered {response.status}")
    if response.status == 200 and response.complete and response.body != original:
        problems.append(f"a spliced body ended cleanly ({len(response.body)} bytes)")
    if g.correct and (response.status, response.complete, response.body) != (200, True, original):
        problems.append("a correct continuation did not complete the body")
    problems.extend(follow_relay.invariant_violations(timeout=3.0))
    if problems:
        raise AssertionError(f"{'; '.join(problems)}\n{g}\nclient got: {response.raw[:300]!r}")
