"""Hypothesis strategies for the fuzz tier: raw request heads and raw upstream responses.

Inputs that hit a finding being fixed on another branch are left out unless
RELAY_FUZZ_KNOWN=1 (see KNOWN): each such input class is generated only when `known=True`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TypeVar

from hypothesis import settings
from hypothesis import strategies as st

# Input classes that fail today, each keyed to the finding being fixed elsewhere. The lead
# removes an entry (and its filter below) once the fix is merged. RELAY_FUZZ_KNOWN=1 generates
# them anyway, to check a fix.
KNOWN: dict[str, str] = {}
INCLUDE_KNOWN = os.environ.get("RELAY_FUZZ_KNOWN") == "1"


def scaled(fraction: float) -> int:
    """A test's share of the loaded profile's example budget (max_examples)."""
    loaded = settings.default
    assert loaded is not None
    return max(3, int(loaded.max_examples * fraction))


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

TOKEN_CHARS = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
CTL = bytes(range(0x00, 0x20)) + b"\x7f"
OBS_TEXT = bytes(range(0x80, 0x100))
FIELD_CTL = bytes(c for c in CTL if c not in b"\r\n")  # control bytes that do not end a line

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
    b"/v2/",
    b"/r/v2/",
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
    choices: list[st.SearchStrategy[bytes]] = [st.sampled_from(HEADER_VALUES)] * 6 + [plain] * 2
    odd = CTL.replace(b"\r", b"").replace(b"\n", b"") + (OBS_TEXT if with_obs_text else b"")
    choices.append(
        st.tuples(plain, st.binary(min_size=1, max_size=3), plain).map(
            lambda t: t[0] + bytes(odd[x % len(odd)] for x in t[1]) + t[2]
        )
    )
    return st.one_of(choices)


T = TypeVar("T")


def _mostly(
    draw: st.DrawFn, common: st.SearchStrategy[T], rare: st.SearchStrategy[T], odds: int
) -> T:
    """`common`, or `rare` one time in `odds`: most requests are valid but for a detail or
    two, so they get past the parser and reach routing, auth and the upstream."""
    return draw(rare if draw(st.integers(1, odds)) == 1 else common)


USEFUL = [
    b"gen/100",
    b"gen/1k",
    b"gen/64k",
    b"gen/1k?cl=0",
    b"gen/1k?gzip=1",
    b"echo",
    b"status/200",
    b"status/404",
    b"status/502",
    b"status/204",
    b"headers?set=X-A:1",
    b"redirect?to=/gen/1",
    b"redirect?to=http://169.254.169.254/",
]


_DIGEST = b"sha256:" + b"ab" * 32
REGISTRY = [
    b"",
    b"library/x/manifests/latest",
    b"library/x/manifests/latest?ns=fuzz.test",
    b"x/manifests/" + _DIGEST + b"?ns=evil.example",
    b"x/blobs/" + _DIGEST,
    b"x/blobs/sha512:" + b"ab" * 64,
    b"x/blobs/sha256:AB",
    b"r/x/manifests/v1",
    b"X/Y/manifests/latest",
    b"a/../b/manifests/latest",
    b"a%2fb/manifests/latest",
    b"x/tags/list?n=999999999999&last=%00",
    b"x/referrers/" + _DIGEST,
    b"x/blobs/uploads/",
    b"_catalog",
    b"x/manifests/" + b"t" * 300,
]


def _target(draw: st.DrawFn) -> bytes:
    if draw(st.integers(1, 12)) == 1:
        return draw(
            st.sampled_from(
                [
                    b"*",
                    b"http://evil.example/x",
                    b"evil.example:443",
                    b"o/gen/1",
                    b"/o/gen/1 x",
                    b"/o/gen/1\x00",
                ]
            )
        )
    prefix = _mostly(draw, st.sampled_from([b"/o/", b"/b/", b"/c/"]), st.sampled_from(PREFIXES), 4)
    if prefix in (b"/v2/", b"/r/v2/"):  # the registry mirror: names, references, ns=
        return prefix + draw(st.sampled_from(REGISTRY))
    if draw(st.booleans()):
        return prefix + draw(st.sampled_from(USEFUL))
    target = prefix + b"/".join(draw(st.lists(st.sampled_from(SEGMENTS), max_size=4)))
    if draw(st.booleans()):
        target += b"/"
    return target + _mostly(draw, st.just(b""), st.sampled_from(QUERIES), 3)


@st.composite
def requests(draw: st.DrawFn, *, secret: bytes, registry: bool = False) -> RequestInput:
    """A request head (and maybe a body) as raw bytes; `registry`: its target is always one of
    the registry mirror's (`/v2/...`, `/r/v2/...`)."""
    method = _mostly(draw, st.sampled_from([b"GET", b"GET", b"HEAD"]), st.sampled_from(METHODS), 6)
    if registry:
        prefix = draw(st.sampled_from([b"/v2/", b"/r/v2/"]))
        target = prefix + draw(st.sampled_from(REGISTRY))
    else:
        target = _target(draw)
    version = _mostly(draw, st.just(b"HTTP/1.1"), st.sampled_from(VERSIONS), 8)
    headers: list[tuple[bytes, bytes]] = []
    hosts = _mostly(draw, st.just(b"\x01"), st.sampled_from([b"", b"\x02"]), 8)[0:1]
    headers += [(b"Host", b"relay"), (b"Host", b"evil.example")][: len(hosts) and hosts[0]]
    if draw(st.integers(1, 10)) > 1:
        headers.append((SECRET_HEADER, secret))
    name = st.one_of(
        st.sampled_from(HEADER_NAMES),
        st.binary(min_size=1, max_size=12).map(
            lambda b: bytes(TOKEN_CHARS[x % len(TOKEN_CHARS)] for x in b)
        ),
    )
    headers.extend(draw(st.lists(st.tuples(name, _header_value(True)), max_size=4)))
    headers = draw(st.permutations(headers))
    body = b""
    framing = draw(st.sampled_from(["none", "none", "none", "cl", "chunked"]))
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


# ---------------------------------------------------------------------------------------------
# Upstream responses
# ---------------------------------------------------------------------------------------------

STATUS_LINES = [
    b"HTTP/1.1 200 OK",
    b"HTTP/1.1 200",
    b"HTTP/1.1 200 ",
    b"HTTP/1.0 200 OK",
    b"HTTP/1.1 404 Not Found",
    b"HTTP/1.1 503 Busy",
    b"HTTP/1.1 206 Partial Content",
    b"HTTP/1.1 302 Found",
    b"HTTP/1.1 299 Odd",
    b"HTTP/1.1 599 Odd",
]
BAD_STATUS_LINES = [
    b"HTTP/1.1 999 Nine",
    b"HTTP/1.1 600 Six",
    b"HTTP/1.1 099 Low",
    b"HTTP/1.1 20 Short",
    b"HTTP/1.1 2000 Long",
    b"HTTP/2 200",
    b"HTTP/1.1 OK",
    b"ICY 200 OK",
    b"HTTP/1.1 200 O\x00K",
    b"garbage",
    b"",
    b"HTTP/1.1 -200 Minus",
]
INTERIM = [
    b"HTTP/1.1 100 Continue\r\n\r\n",
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
    b"HTTP/1.1 102 Processing\r\n\r\n",
]
RESPONSE_HEADER_NAMES = [
    b"Content-Type",
    b"ETag",
    b"Last-Modified",
    b"Content-Encoding",
    b"Connection",
    b"Keep-Alive",
    b"Set-Cookie",
    b"Location",
    b"X-Extra",
    b"Content-Range",
    b"Accept-Ranges",
    b"Trailer",
    b"Via",
    b"Upgrade",
    b"Proxy-Authenticate",
    b"Content-Disposition",
    b"Cache-Control",
]
RESPONSE_HEADER_VALUES = [
    b"application/octet-stream",
    b'"v1"',
    b"gzip",
    b"close",
    b"keep-alive",
    b"X-Extra",
    b"a=b; HttpOnly",
    b"/elsewhere",
    b"http://169.254.169.254/",
    b"bytes 0-4/5",
    b"bytes",
    b"Expires",
    b"1.1 other",
    b"",
    b"attachment; filename=../../x",
    b"no-store",
]
# How a body is framed (and maybe broken). CLEAN ones end as announced.
FRAMINGS = [
    "cl",
    "chunked",
    "close_fin",
    "cl_short",
    "cl_long",
    "chunked_cut",
    "chunked_bad",
    "close_rst",
    "stall",
    "dup_cl_same",
    "dup_cl_diff",
    "cl_te",
    "cl_list",
    "te_gzip_chunked",
    "cl_space",
]
CLEAN = frozenset({"cl", "chunked", "close_fin", "cl_long"})
TRUNCATED = frozenset({"cl_short", "chunked_cut", "chunked_bad", "close_rst", "stall"})


@dataclasses.dataclass(frozen=True)
class ResponseInput:
    status_line: bytes
    interim: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    framing: str
    body: bytes  # the body as the upstream means it
    extra: bytes  # bytes after the body (cl_long, and after a complete response)
    pieces: int  # the head is sent in this many pieces, a short pause between them
    wire: bytes  # everything sent before the end
    end: str  # "keep", "fin", "rst", "stall" (scripted_upstream.Reply.end)

    @property
    def status(self) -> int:
        parts = self.status_line.split(b" ")
        ok = len(parts) > 1 and len(parts[1]) == 3 and parts[1].isdigit()
        return int(parts[1]) if ok else 0

    @property
    def valid_status_line(self) -> bool:
        return self.status_line in STATUS_LINES

    @property
    def header_bytes_ok(self) -> bool:
        return all(
            not any(c in CTL.replace(b"\t", b"") for c in v) and not any(c >= 0x80 for c in v)
            for _, v in self.headers
        )

    @property
    def clean(self) -> bool:
        """A well-formed response relay must pass through byte for byte."""
        http10_chunked = self.status_line.startswith(b"HTTP/1.0") and "chunked" in self.framing
        return (
            not http10_chunked  # RFC 9112 6.1: faulty framing
            # A reset discards what the receiver has not read yet: relay may never see it all.
            and self.end != "rst"
            and self.valid_status_line
            and self.header_bytes_ok
            and self.framing in CLEAN
            and not self.interim
        )


def _chunked(draw: st.DrawFn, body: bytes) -> list[bytes]:
    """body as chunks, with varied size spellings and extensions; the last-chunk not included."""
    out = []
    rest = body
    while rest:
        n = draw(st.integers(1, max(1, len(rest))))
        size = draw(st.sampled_from([b"%x", b"%X", b"0%x", b"%x;ext=1", b"%x;a", b'%x ;x="y"']))
        out.append(size % n + b"\r\n" + rest[:n] + b"\r\n")
        rest = rest[n:]
    return out


@st.composite
def responses(draw: st.DrawFn) -> ResponseInput:
    """An upstream response as raw bytes, and how the upstream ends the exchange."""
    status_line = _mostly(
        draw,
        st.sampled_from(STATUS_LINES[:1] * 6 + STATUS_LINES),
        st.sampled_from(BAD_STATUS_LINES),
        6,
    )
    interim = (
        b"".join(draw(st.lists(st.sampled_from(INTERIM), max_size=2)))
        if draw(st.integers(1, 6)) == 1
        else b""
    )
    value = st.one_of(
        *[st.sampled_from(RESPONSE_HEADER_VALUES)] * 4,
        *[
            st.tuples(
                st.sampled_from(RESPONSE_HEADER_VALUES), st.binary(min_size=1, max_size=2)
            ).map(
                lambda t, odd=odd: t[0] + bytes(odd[x % len(odd)] for x in t[1])  # type: ignore[misc]
            )
            for odd in (FIELD_CTL, OBS_TEXT)
        ],
    )
    headers = list(
        draw(st.lists(st.tuples(st.sampled_from(RESPONSE_HEADER_NAMES), value), max_size=4))
    )
    body = draw(st.binary(min_size=1, max_size=3000))
    framing = _mostly(
        draw, st.sampled_from(["cl", "chunked", "close_fin"]), st.sampled_from(FRAMINGS), 2
    )
    cut = draw(st.integers(0, len(body) - 1))
    extra = b""
    after = b""
    end = "fin"
    if framing in ("cl", "cl_long", "chunked"):
        end = draw(st.sampled_from(["keep", "keep", "fin", "rst"]))
        if draw(st.integers(1, 4)) == 1 or framing == "cl_long":
            extra = draw(
                st.sampled_from(
                    [b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL", b"\r\n", b"junk"]
                )
            )
    if framing in ("cl", "cl_short", "cl_long", "stall"):
        length = {"cl_short": len(body) + draw(st.integers(1, 1000)), "cl_long": len(body)}.get(
            framing, len(body)
        )
        headers.append((b"Content-Length", str(length).encode()))
        payload = body[:cut] if framing == "stall" else body
        end = "stall" if framing == "stall" else ("fin" if framing == "cl_short" else end)
    elif framing in ("chunked", "chunked_cut", "chunked_bad", "te_gzip_chunked"):
        headers.append(
            (b"Transfer-Encoding", b"gzip, chunked" if framing == "te_gzip_chunked" else b"chunked")
        )
        chunks = _chunked(draw, body)
        if framing == "chunked_cut":
            payload = b"".join(chunks)[: draw(st.integers(0, len(b"".join(chunks)) - 1))]
            end = draw(st.sampled_from(["fin", "rst", "stall"]))
        elif framing == "chunked_bad":
            payload = b"".join(chunks) + draw(
                st.sampled_from([b"zz\r\n", b"-1\r\n", b"1\r\nab\r\n", b"ffffffffffffffffff\r\n"])
            )
            end = "fin"
        else:
            payload = (
                b"".join(chunks)
                + b"0\r\n"
                + draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
                + b"\r\n"
            )
    elif framing in ("close_fin", "close_rst"):
        payload = body if framing == "close_fin" else body[:cut]
        end = "fin" if framing == "close_fin" else "rst"
    else:  # conflicting or odd framing: dup_cl_same, dup_cl_diff, cl_te, cl_list, cl_space
        n = str(len(body)).encode()
        headers += {
            "dup_cl_same": [(b"Content-Length", n), (b"Content-Length", n)],
            "dup_cl_diff": [
                (b"Content-Length", n),
                (b"Content-Length", str(len(body) + 1).encode()),
            ],
            "cl_te": [(b"Content-Length", n), (b"Transfer-Encoding", b"chunked")],
            "cl_list": [(b"Content-Length", n + b", " + n)],
            "cl_space": [(b"Content-Length ", n)],
        }[framing]
        payload = body
    headers = draw(st.permutations(headers))
    head = status_line + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n"
    wire = interim + head + payload + extra + after
    pieces = _mostly(draw, st.just(1), st.integers(2, 5), 8)
    return ResponseInput(
        status_line, interim, tuple(headers), framing, body, extra, pieces, wire, end
    )
