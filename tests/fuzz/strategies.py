"""Hypothesis strategies for the fuzz tier: raw request heads and raw upstream responses.

Inputs that hit a finding being fixed on another branch are left out unless
RELAY_FUZZ_KNOWN=1 (see KNOWN): each such input class is generated only when `known=True`.
"""

from __future__ import annotations

import dataclasses
import os

from hypothesis import strategies as st

# Input classes that fail today, each keyed to the finding being fixed elsewhere. The lead
# removes an entry (and its filter below) once the fix is merged. RELAY_FUZZ_KNOWN=1 generates
# them anyway, to check a fix.
KNOWN: dict[str, str] = {}
INCLUDE_KNOWN = os.environ.get("RELAY_FUZZ_KNOWN") == "1"


def known(name: str) -> bool:
    """Whether inputs of the known-finding class `name` are generated."""
    assert name in KNOWN, name
    return INCLUDE_KNOWN


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CTL = bytes(range(0x00, 0x20)) + b"\x7f"
OBS_TEXT = bytes(range(0x80, 0x100))

METHODS = [
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
    b"CONNECT",
    b"get",
    b"PRI",
    b"G\x00T",
    b"",
]
VERSIONS = [
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"HTTP/1.2",
    b"HTTP/2.0",
    b"HTTP/0.9",
    b"http/1.1",
    b"HTTP/1.1 ",
    b"HTTP/11",
    b"",
]
PREFIXES = [
    b"/o/",
    b"/b/",
    b"/c/",
    b"/",
    b"/healthz",
    b"/readyz",
    b"/metrics",
    b"/downloads",
    b"/files/",
    b"/o",
    b"//o/",
    b"/B/",
]
SEGMENTS = [
    b"gen",
    b"100",
    b"1k",
    b"echo",
    b"status",
    b"200",
    b"502",
    b"headers",
    b"redirect",
    b"..",
    b".",
    b"%2e%2e",
    b"%2E.",
    b".%2e",
    b"%2f",
    b"%2F..",
    b"%252e%252e",
    b"%5c",
    b"..\\x",
    b"%00",
    b"a%00b",
    b"%",
    b"%g1",
    b"..;x",
    b";",
    b"@evil",
    b":",
    b"~",
    b"evil.example",
    b"%c0%ae%c0%ae",
    b"%e0%80%ae",
    b"%ef%bc%8e%ef%bc%8e",
    b"\xef\xbc\x8e\xef\xbc\x8e",
    b"%u002e",
    b"a b",
    b"#frag",
    b"x?y",
    b"\t",
    b"\x7f",
]
QUERIES = [
    b"",
    b"?",
    b"?a=b",
    b"?cl=0",
    b"?gzip=1",
    b"?v=2",
    b"?expires=1&signature=00",
    b"?expires=99999999999&signature=zz",
    b"?to=http://169.254.169.254/",
    b"?close_after=10",
    b"?a=%00",
    b"?a=\x80",
    b"?a=b#c",
    b"?set=X:1",
]
HEADER_NAMES = [
    b"Host",
    b"Range",
    b"If-Range",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Connection",
    b"X-Forwarded-For",
    b"X-Forwarded-Host",
    b"Forwarded",
    b"Authorization",
    b"Cookie",
    b"Expect",
    b"Upgrade",
    b"TE",
    b"Accept-Encoding",
    b"User-Agent",
    b"Via",
    b"X-Request-Id",
    b"If-None-Match",
    b"If-Modified-Since",
    b"Keep-Alive",
    b"Proxy-Authorization",
    b"X-Relay-Secret",
    b"host",
    b"HOST",
    b"Content-Type",
    b"Max-Forwards",
]
HEADER_VALUES = [
    b"",
    b"relay",
    b"127.0.0.1",
    b"evil.example:80",
    b"bytes=0-10",
    b"bytes=-5",
    b"bytes=5-",
    b"bytes=0-0,2-3",
    b"bytes=10-5",
    b"bytes=x",
    b"items=0-1",
    b"bytes=99999999999999999999-",
    b'"v1"',
    b'W/"v1"',
    b"Wed, 01 Jan 2025 00:00:00 GMT",
    b"chunked",
    b"gzip, chunked",
    b"identity",
    b"close",
    b"keep-alive, Range",
    b"Upgrade",
    b"h2c",
    b"100-continue",
    b"0",
    b"5",
    b"-1",
    b"1, 1",
    b"00005",
    b"Bearer token",
    b"a=b",
    b"for=1.2.3.4",
    b"trailers",
]

SECRET_HEADER = b"X-Relay-Secret"


@dataclasses.dataclass(frozen=True)
class RequestInput:
    method: bytes
    target: bytes
    version: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    raw: bytes


def _header_value(with_obs_text: bool) -> st.SearchStrategy[bytes]:
    alphabet = bytes(range(0x20, 0x7F)) + b"\t"
    plain = st.binary(max_size=20).map(lambda b: bytes(alphabet[x % len(alphabet)] for x in b))
    choices: list[st.SearchStrategy[bytes]] = [st.sampled_from(HEADER_VALUES), plain]
    odd = CTL.replace(b"\r", b"").replace(b"\n", b"") + (OBS_TEXT if with_obs_text else b"")
    choices.append(
        st.tuples(plain, st.binary(min_size=1, max_size=3), plain).map(
            lambda t: t[0] + bytes(odd[x % len(odd)] for x in t[1]) + t[2]
        )
    )
    return st.one_of(choices)


@st.composite
def requests(draw: st.DrawFn, *, secret: bytes) -> RequestInput:
    """A request head (and maybe a body) as raw bytes."""
    method = draw(st.sampled_from(METHODS))
    if draw(st.integers(0, 9)) == 0:
        target = draw(
            st.sampled_from(
                [
                    b"*",
                    b"http://evil.example/x",
                    b"evil.example:443",
                    b"",
                    b"o/gen/1",
                    b"/o/gen/1 x",
                ]
            )
        )
    else:
        target = draw(st.sampled_from(PREFIXES))
        target += b"/".join(draw(st.lists(st.sampled_from(SEGMENTS), max_size=4)))
        if draw(st.booleans()):
            target += b"/"
        target += draw(st.sampled_from(QUERIES))
    version = draw(st.sampled_from(VERSIONS))
    headers: list[tuple[bytes, bytes]] = []
    if draw(st.integers(0, 9)) > 0:
        headers.append((b"Host", b"relay"))
    if draw(st.integers(0, 9)) > 1:
        headers.append((SECRET_HEADER, secret))
    with_obs_text = known("obs-text in a header value")
    extra = st.tuples(
        st.one_of(
            st.sampled_from(HEADER_NAMES),
            st.binary(min_size=1, max_size=12).map(
                lambda b: bytes(TOKEN_CHARS[x % len(TOKEN_CHARS)] for x in b)
            ),
        ),
        _header_value(with_obs_text),
    )
    headers.extend(draw(st.lists(extra, max_size=6)))
    headers = draw(st.permutations(headers))
    body = b""
    framing = draw(st.sampled_from(["none", "none", "cl", "chunked"]))
    if framing == "cl":
        body = draw(st.binary(max_size=40))
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "chunked":
        data = draw(st.binary(min_size=1, max_size=20))
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
        headers.append((b"Transfer-Encoding", b"chunked"))
    head = method + b" " + target + b" " + version + b"\r\n"
    head += b"".join(n + b": " + v + b"\r\n" for n, v in headers)
    raw = head + b"\r\n" + body
    return RequestInput(method, target, version, tuple(headers), body, raw)
