"""The rules of several mirrors per route, sans-IO: which answers fall through, which mirror
rests and when it is asked again, what pins a body's identity, and the configuration forms."""

from __future__ import annotations

import httpx
import pytest

from relay.config import Config, Mirror, Route
from relay.errors import (
    ConfigError,
    MirrorsDown,
    PoolExhausted,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from relay.http.continuation import CONTINUATION, SWITCHED_FROM, Continuation, Next
from relay.http.digests import b64_of_hex
from relay.net.mirrors import (
    MirrorBoard,
    MirrorHealth,
    RouteMirrors,
    error_falls_through,
    falls_through,
    path_sha256,
    pinned_sha256,
)

A, B, C = "https://a.example/", "https://b.example/m/", "https://c.example/"
SHA = "ab" * 32


def mirrored(*urls: str, **keys: object) -> Route:
    return Route(prefix="/m/", upstreams=tuple(Mirror(url=u) for u in urls), **keys)  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- the policies -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [404, 410])
def test_not_found_falls_through_under_both_policies(status: int) -> None:
    assert falls_through("not-found", status)
    assert falls_through("any", status)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 429])
def test_failures_fall_through_only_under_any(status: int) -> None:
    assert falls_through("any", status)
    assert not falls_through("not-found", status)


@pytest.mark.parametrize("status", [200, 206, 304, 301, 400, 401, 403, 407, 416, 451])
def test_answers_and_refusals_never_fall_through(status: int) -> None:
    """A refusal (401, 403, 407, any other 4xx) is the answer, whatever the policy."""
    assert not falls_through("any", status)
    assert not falls_through("not-found", status)


def test_connect_errors_fall_through_only_under_any_and_a_full_pool_never() -> None:
    refused, timeout = UpstreamUnavailable("refused"), UpstreamTimeout("timed out")
    assert error_falls_through("any", refused)
    assert error_falls_through("any", timeout)
    assert not error_falls_through("not-found", refused)
    assert not error_falls_through("any", PoolExhausted("full"))


# ---- passive health -----------------------------------------------------------------------------


def test_a_mirror_rests_after_max_fails_within_fail_timeout_then_is_asked_again() -> None:
    health = MirrorHealth(0, Mirror(url=A), max_fails=2, fail_timeout=10)
    health.failed(100, "answered 503")
    assert not health.resting(100)
    health.failed(111, "answered 503")  # the first is older than fail_timeout: one failure
    assert not health.resting(111)
    health.failed(115, "answered 503")
    assert health.resting(115)
    assert health.resting(124.9)
    assert not health.resting(125)  # asked again after fail_timeout


def test_the_first_failure_after_a_rest_makes_it_rest_again_and_a_success_heals() -> None:
    health = MirrorHealth(0, Mirror(url=A), max_fails=3, fail_timeout=10)
    for t in (1, 2, 3):
        health.failed(t, "refused")
    assert health.resting(5)
    health.failed(14, "refused")  # on probation: one failure is enough
    assert health.resting(20)
    health.succeeded()
    assert not health.resting(20)
    health.failed(21, "refused")
    assert not health.resting(21)


def test_max_fails_zero_never_rests() -> None:
    health = MirrorHealth(0, Mirror(url=A), max_fails=0, fail_timeout=10)
    for t in range(10):
        health.failed(t, "refused")
    assert not health.resting(10)
    assert health.failures == 10


def test_order_skips_resting_mirrors_under_any_but_not_under_not_found() -> None:
    clock = Clock()
    for policy, expected in (("any", [1, 2]), ("not-found", [0, 1, 2])):
        mirrors = RouteMirrors(mirrored(A, B, C, failover=policy), clock)
        mirrors.failed(0, "refused")
        assert [a.index for a in mirrors.order()] == expected
        clock.now += 10
        assert [a.index for a in mirrors.order()] == [0, 1, 2]


def test_every_mirror_resting_answers_at_once_naming_the_cause() -> None:
    clock = Clock()
    mirrors = RouteMirrors(mirrored(A, B, failover="any", fail_timeout=30), clock)
    mirrors.failed(0, "cannot connect to the upstream")
    clock.now += 5
    mirrors.failed(1, "answered 503")
    with pytest.raises(MirrorsDown) as caught:
        mirrors.order()
    assert caught.value.status_code == 503
    assert "(a.example): cannot connect" in caught.value.reason
    assert "(b.example): answered 503" in caught.value.reason
    assert caught.value.headers == {"Retry-After": "25"}


def test_a_single_upstream_has_no_health() -> None:
    """One upstream keeps working as it always did: always asked, never resting."""
    mirrors = RouteMirrors(Route(prefix="/o/", upstream=A), Clock())
    for _ in range(5):
        mirrors.failed(0, "refused")
    assert [a.index for a in mirrors.order()] == [0]


def test_a_continuation_order_starts_after_the_mirror_that_failed() -> None:
    mirrors = RouteMirrors(mirrored(A, B, C, failover="any"), Clock())
    assert [a.index for a in mirrors.order(2)] == [2, 0, 1]
    assert mirrors.index_of(B + "x/y") == 1
    assert mirrors.index_of("https://elsewhere/x") is None


def test_the_board_reports_each_mirror_and_is_bounded_by_the_configuration() -> None:
    clock = Clock()
    route = mirrored(A, B, failover="any")
    board = MirrorBoard([route, Route(prefix="/o/", upstream=A)], clock)
    board.of(route).failed(0, "answered 502")
    assert board.report() == [
        "mirror /m/ 1 a.example: resting for 10s after answered 502",
        "mirror /m/ 2 b.example: up",
    ]
    assert set(board.routes) == {"/m/", "/o/"}


# ---- what pins a body ---------------------------------------------------------------------------


def test_digest_named_paths_pin_a_body() -> None:
    assert path_sha256(f"/v2/lib/x/blobs/sha256:{SHA}") == SHA
    assert path_sha256(f"/v2/lib/x/blobs/sha256%3A{SHA}") == SHA
    assert path_sha256(f"/debian/dists/stable/main/binary-amd64/by-hash/SHA256/{SHA}") == SHA
    assert path_sha256(f"/v2/lib/x/manifests/sha256:{SHA}") is None
    assert path_sha256("/pool/main/h/hello/hello_1.0_all.deb") is None


def test_a_pin_needs_several_mirrors_failover_any_and_one_digest() -> None:
    route = mirrored(A, B, failover="any")
    announced = httpx.Headers({"repr-digest": f"sha-256=:{b64_of_hex(SHA)}:"})
    assert pinned_sha256(route, f"/m/blobs/sha256:{SHA}", httpx.Headers()) == SHA
    assert pinned_sha256(route, "/m/file", announced) == SHA
    assert pinned_sha256(route, "/m/file", httpx.Headers({"x-linked-etag": f'"{SHA}"'})) == SHA
    assert pinned_sha256(route, "/m/file", httpx.Headers(), known=SHA) == SHA
    assert pinned_sha256(route, "/m/file", httpx.Headers()) is None
    other = "cd" * 32
    assert pinned_sha256(route, f"/m/blobs/sha256:{other}", announced) is None  # disagree
    assert pinned_sha256(mirrored(A, B), "/m/file", announced) is None  # not-found policy
    assert pinned_sha256(Route(prefix="/o/", upstream=A), "/o/f", announced) is None


# ---- the continuation rule across mirrors -------------------------------------------------------


def _answer(headers: dict[str, str], *, switched: bool, pinned: str | None) -> httpx.Response:
    request = httpx.Request("GET", B + "f", headers={"range": "bytes=10-"})
    request.extensions[CONTINUATION] = pinned or ""
    response = httpx.Response(206, headers=headers, request=request)
    if switched:
        response.extensions[SWITCHED_FROM] = 0
    return response


def test_another_mirrors_206_continues_on_the_pinned_digest_not_its_validator() -> None:
    plan = Continuation(validator='"a-1"', total=100, end=99)
    other = {"content-range": "bytes 10-99/100", "etag": '"b-7"'}
    assert plan.judge_answer(_answer(other, switched=True, pinned=SHA), 10).continues
    # The same answer from the same mirror is another version: never appended.
    verdict = plan.judge_answer(_answer(other, switched=False, pinned=SHA), 10)
    assert verdict.next is Next.CHANGED
    # From another mirror without a pin: never appended, whatever its validator.
    same_etag = {"content-range": "bytes 10-99/100", "etag": '"a-1"'}
    assert (
        plan.judge_answer(_answer(same_etag, switched=True, pinned=None), 10).next is Next.CHANGED
    )


def test_another_mirror_must_match_the_offset_total_and_announced_digest() -> None:
    plan = Continuation(validator='"a-1"', total=100, end=99)
    wrong_total = {"content-range": "bytes 10-109/110"}
    assert plan.judge_answer(_answer(wrong_total, switched=True, pinned=SHA), 10).next is (
        Next.CHANGED
    )
    wrong_start = {"content-range": "bytes 0-99/100"}
    assert plan.judge_answer(_answer(wrong_start, switched=True, pinned=SHA), 10).next is (
        Next.BAD_RANGE
    )
    digest = {
        "content-range": "bytes 10-99/100",
        "repr-digest": f"sha-256=:{b64_of_hex('cd' * 32)}:",
    }
    assert plan.judge_answer(_answer(digest, switched=True, pinned=SHA), 10).next is Next.CHANGED


# ---- configuration ------------------------------------------------------------------------------


def test_the_single_upstream_form_is_unchanged() -> None:
    route = Route.parse("/gh/=https://github.com")
    assert route.upstream == "https://github.com/"
    assert [m.url for m in route.upstreams] == ["https://github.com/"]
    assert route.failover == "not-found"


def test_command_line_separators_choose_the_policy() -> None:
    comma = Route.parse(f"/m/={A},{B}")
    bar = Route.parse(f"/m/={A}|{B}")
    assert [m.url for m in comma.upstreams] == [A, B]
    assert comma.upstream == A
    assert (comma.failover, bar.failover) == ("not-found", "any")
    with pytest.raises(ConfigError, match="not both"):
        Route.parse(f"/m/={A},{B}|{C}")


def test_the_environment_separates_routes_from_mirrors() -> None:
    config = Config.load(environ={"RELAY_ROUTES": f"/m/={A},{B},/o/={C} /p/={A}|{C}"})
    assert [(r.prefix, [m.url for m in r.upstreams]) for r in config.routes] == [
        ("/m/", [A, B]),
        ("/o/", [C]),
        ("/p/", [A, C]),
    ]
    # The forms that worked before mirrors still mean what they meant.
    for text in (f"/m/={A}, /o/={C}", f"/m/={A},/o/={C}", f"/m/={A} /o/={C},"):
        routes = Config.load(environ={"RELAY_ROUTES": text}).routes
        assert [(r.prefix, [m.url for m in r.upstreams]) for r in routes] == [
            ("/m/", [A]),
            ("/o/", [C]),
        ]


def test_toml_mirrors_each_with_their_own_credential(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "relay.toml"
    path.write_text(
        "[[routes]]\n"
        'prefix = "/m/"\n'
        f'upstreams = [{{ url = "{A}", auth_env = "TOKEN_A" }}, "{B}", '
        f'{{ url = "{C}", auth_env = "TOKEN_C" }}]\n'
        'failover = "any"\n'
    )
    config = Config.load(config_file=path, environ={"TOKEN_A": "Bearer a", "TOKEN_C": "Bearer c"})
    route = config.routes[0]
    assert [route.mirror_credential(i) for i in range(3)] == ["Bearer a", "", "Bearer c"]
    assert "Bearer" not in repr(route)
    assert "Bearer" not in str(route.describe())


def test_a_route_credential_is_not_shared_by_several_mirrors() -> None:
    with pytest.raises(ConfigError, match="its own credential"):
        mirrored(A, B, auth_env="TOKEN")
    with pytest.raises(ConfigError, match="twice"):
        mirrored(A, A)
    with pytest.raises(ConfigError, match="hedge_after"):
        mirrored(A, B, hedge_after=1.0)  # needs failover = "any"
    with pytest.raises(ConfigError, match="upstream or upstreams"):
        Route(prefix="/m/")


def test_every_mirror_passes_the_egress_check() -> None:
    with pytest.raises(ConfigError, match="allow_private"):
        mirrored(A, "http://169.254.169.254/")
