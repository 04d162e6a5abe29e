"""Units behind issue 9's fixes: admission per client, path look-alikes, header bytes, the new
settings."""

from __future__ import annotations

import pytest

from relay.config import Config, Route
from relay.errors import BadHeader, BadPath, Overloaded, TooManyStreams
from relay.net.routing import check_relative_path
from relay.proxy.admission import StreamLimiter
from relay.proxy.forwarded import Forwarded
from relay.proxy.headers import upstream_request_headers

ROUTE = Route(prefix="/o/", upstream="https://example.com/")
FORWARDED = Forwarded("1.2.3.4", "http", "relay", "1.2.3.4")


def test_limiter_refuses_past_the_per_client_limit_and_forgets_released_clients() -> None:
    limiter = StreamLimiter(3, per_client=2)
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is None
    assert isinstance(limiter.acquire("a"), TooManyStreams)
    assert limiter.acquire("b") is None
    assert isinstance(limiter.acquire("c"), Overloaded)
    assert limiter.active == 3
    for client in ("a", "a", "b"):
        limiter.release(client)
    assert limiter.active == 0
    assert limiter.by_client == {}


def test_limiter_without_a_per_client_limit_counts_only_the_total() -> None:
    limiter = StreamLimiter(2)
    assert limiter.acquire("a") is None
    assert limiter.acquire("a") is None
    assert isinstance(limiter.acquire(None), Overloaded)
    limiter.release("a")
    limiter.release("a")
    assert (limiter.active, limiter.by_client) == (0, {})


@pytest.mark.parametrize(
    "rest",
    [
        b"%c0%ae%c0%ae/admin",
        b"%e0%80%ae",  # three-byte overlong '.'
        b"%ed%a0%80",  # a UTF-16 surrogate
        b"%ff",
        b"a%ef%bc%8eb",  # fullwidth full stop anywhere in a segment
        b"%e2%80%a4",  # one dot leader
        b"%e2%80%a6",  # horizontal ellipsis
        b"%ef%bc%8f",  # fullwidth solidus
        b"%e2%88%95",  # division slash
        b"%e2%81%84",  # fraction slash
        b"%e2%88%96",  # set minus
        b"%e2%a7%b8",  # big solidus
        b"%ef%b9%a8",  # small reverse solidus
    ],
)
def test_non_utf8_escapes_and_separator_lookalikes_are_refused(rest: bytes) -> None:
    with pytest.raises(BadPath):
        check_relative_path(rest)


@pytest.mark.parametrize("rest", [b"caf%C3%A9.tar.gz", b"%E6%97%A5%E6%9C%AC/%E2%82%AC.bin"])
def test_non_ascii_names_without_lookalikes_pass(rest: bytes) -> None:
    check_relative_path(rest)


@pytest.mark.parametrize(
    "name", [b"user-agent", b"range", b"accept", b"if-none-match", b"if-range", b"via"]
)
def test_forwarded_header_with_obs_text_is_refused(name: bytes) -> None:
    with pytest.raises(BadHeader, match=name.decode()):
        upstream_request_headers([(name, b"caf\xe9")], forwarded=FORWARDED, route=ROUTE)


def test_obs_text_in_a_dropped_header_is_ignored() -> None:
    headers = upstream_request_headers(
        [(b"x-note", b"caf\xe9"), (b"cookie", b"caf\xe9")], forwarded=FORWARDED, route=ROUTE
    )
    assert not any(name in ("x-note", "cookie") for name, _ in headers)


def test_obs_text_in_host_or_forwarded_for_is_refused() -> None:
    with pytest.raises(BadHeader, match="host"):
        upstream_request_headers(
            [], forwarded=Forwarded("1.2.3.4", "http", "caf\xe9", None), route=ROUTE
        )
    with pytest.raises(BadHeader, match="x-forwarded-for"):
        upstream_request_headers(
            [], forwarded=Forwarded("6.6.6.\xe9, 1.2.3.4", "http", None, None), route=ROUTE
        )


def test_new_settings_load_from_every_source() -> None:
    config = Config.load(
        cli={"min_send_rate": "16384", "max_streams_per_client": "4"},
        environ={"RELAY_BODY_TIMEOUT": "5", "RELAY_MAX_BODY_BYTES": "1024"},
    )
    assert (config.min_send_rate, config.max_streams_per_client) == (16384, 4)
    assert (config.body_timeout, config.max_body_bytes) == (5.0, 1024)
    defaults = Config()
    assert (defaults.min_send_rate, defaults.max_streams_per_client) == (0, 0)
    assert (defaults.min_rate_window, defaults.body_timeout) == (30.0, 15.0)


def test_new_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="min_rate_window"):
        Config.load(environ={"RELAY_MIN_RATE_WINDOW": "0"})
    with pytest.raises(ValueError, match="max_streams_per_client"):
        Config.load(cli={"max_streams_per_client": "-1"})


def test_non_ascii_route_credential_is_refused_at_startup() -> None:
    route = Route(prefix="/o/", upstream="https://example.com/", auth_env="TOKEN")
    with pytest.raises(ValueError, match="ASCII"):
        route.resolve_credential({"TOKEN": "Bearer caf\xe9"})
    assert route.resolve_credential({"TOKEN": "Bearer cafe"}).credential == "Bearer cafe"
