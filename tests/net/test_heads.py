"""The one check of an upstream response head the transport makes."""

from __future__ import annotations

import httpx
import pytest

from relay.net.transports import aiohttp_compat
from relay.net.transports.heads import check_head, head_problem

OK_HEADERS = [(b"Content-Type", b"text/plain"), (b"X-Tab", b"a\tb"), (b"X-High", b"caf\xe9")]


@pytest.mark.parametrize("status", [200, 204, 304, 404, 599])
def test_heads_ordinary_heads_pass(status: int) -> None:
    assert head_problem(status, OK_HEADERS) is None
    assert head_problem(status, [(b"Transfer-Encoding", b"chunked")]) is None
    assert head_problem(status, [(b"transfer-encoding", b" Chunked ")]) is None


@pytest.mark.parametrize("status", [0, 99, 100, 101, 103, 199, 600, 999])
def test_heads_statuses_relay_cannot_relay_are_refused(status: int) -> None:
    assert head_problem(status, OK_HEADERS) == f"status {status} cannot be relayed"


@pytest.mark.parametrize("value", [b"a\x01b", b"a\x7fb", b"a\x00", b"a\rb", b"a\nb", b"\x1f"])
def test_heads_control_bytes_in_a_value_are_refused(value: bytes) -> None:
    assert head_problem(200, [(b"X-Junk", value)]) == "control character in a header value"


@pytest.mark.parametrize("name", [b"Content-Length ", b"", b"X Y", b"X:Y", b"caf\xe9"])
def test_heads_malformed_names_are_refused(name: bytes) -> None:
    assert head_problem(200, [(name, b"5")]) == "malformed header name"


@pytest.mark.parametrize("value", [b"gzip, chunked", b"gzip", b"chunked, chunked, gzip", b""])
def test_heads_transfer_codings_other_than_chunked_are_refused(value: bytes) -> None:
    headers = [(b"Transfer-Encoding", value)]
    assert head_problem(200, headers) == "unsupported transfer coding"


def test_heads_check_head_raises_a_protocol_error_naming_the_problem() -> None:
    request = httpx.Request("GET", "http://upstream.test/x")
    with pytest.raises(httpx.RemoteProtocolError, match="invalid response: status 999"):
        check_head(request, 999, [])
    check_head(request, 200, OK_HEADERS)


def test_heads_compat_modules_fail_clearly_on_a_missing_private_attribute() -> None:
    with pytest.raises(aiohttp_compat.AiohttpIncompatible, match="relay needs aiohttp's X_y"):
        aiohttp_compat._require(False, "X_y")
