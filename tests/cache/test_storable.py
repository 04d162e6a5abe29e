"""relay.cache.storable: what a fill does with the upstream's answer, and the records it keeps
(pure functions: no file, no network)."""

from __future__ import annotations

import httpx
import pytest

from relay import Route
from relay.cache import storable
from relay.cache.key import index_key, variant_key
from relay.cache.storable import TOO_LARGE, VARY_LEARNED
from relay.cache.store import Meta

ROUTE = Route(prefix="/o/", upstream="http://upstream.test/")
PYPI = Route(prefix="/pypi/", upstream="http://pypi.test/", preset="pypi")
KEY = "/o/\x00/o/f"
LIMIT = 1000


def _whole(
    headers: dict[str, str],
    *,
    status: int = 200,
    key: str = KEY,
    route: Route = ROUTE,
    room: bool = True,
    clients: bool = True,
    content_addressed: bool = False,
) -> storable.Whole:
    return storable.whole(
        route,
        key,
        status,
        httpx.Headers(headers),
        max_object_bytes=LIMIT,
        content_addressed=content_addressed,
        has_clients=clients,
        room=lambda size: room and size <= LIMIT,  # as the cache's reservation
    )


def test_a_sized_cacheable_200_is_stored_whole() -> None:
    verdict = _whole({"content-length": "10", "cache-control": "max-age=60"})
    assert (verdict.action, verdict.reason, verdict.length) == ("store", None, 10)


@pytest.mark.parametrize(
    ("headers", "status", "action", "answers"),
    [
        ({"content-length": "5", "cache-control": "no-store"}, 200, "answer", "all"),
        ({"content-length": "5", "cache-control": "private"}, 200, "answer", "one"),
        ({"content-length": "5", "set-cookie": "a=b"}, 200, "answer", "one"),
        ({"content-length": "5", "vary": "*"}, 200, "close", "none"),
        ({"content-length": "5"}, 503, "answer", "all"),
    ],
)
def test_an_answer_not_stored_answers_the_clients_it_may(
    headers: dict[str, str], status: int, action: str, answers: str
) -> None:
    verdict = _whole(headers, status=status)
    assert verdict.reason is not None
    assert (verdict.action, verdict.answers) == (action, answers)


def test_an_answer_not_stored_is_closed_when_no_client_waits() -> None:
    verdict = _whole({"content-length": "5", "cache-control": "no-store"}, clients=False)
    assert verdict.action == "close"


def test_a_content_addressed_objects_refusal_answers_no_client() -> None:
    verdict = _whole({"content-length": "5"}, status=403, content_addressed=True)
    assert (verdict.action, verdict.answers) == ("close", "none")


def test_a_body_over_the_object_limit_is_kept_open_for_one_client() -> None:
    verdict = _whole({"content-length": str(LIMIT + 1)})
    assert (verdict.action, verdict.reason, verdict.answers) == ("keep_open", TOO_LARGE, "none")


def test_a_body_without_room_is_kept_open_for_one_client() -> None:
    verdict = _whole({"content-length": "10"}, room=False)
    assert (verdict.action, verdict.reason) == ("keep_open", "no room")


def test_an_unstorable_answer_the_file_cannot_hold_is_kept_open_as_too_large() -> None:
    verdict = _whole({"content-length": str(LIMIT + 1), "cache-control": "no-store"})
    assert (verdict.action, verdict.reason) == ("keep_open", TOO_LARGE)


def test_a_close_delimited_body_is_stored_only_with_an_announced_digest() -> None:
    assert _whole({}).reason == "body delimited by close"
    digest = "sha-256=:" + "A" * 43 + "=:"
    assert _whole({"repr-digest": digest}).action == "store"


def test_vary_on_accept_encoding_is_learned_then_stored_per_variant() -> None:
    headers = {"content-length": "5", "vary": "Accept-Encoding"}
    assert _whole(headers).reason == VARY_LEARNED
    assert _whole(headers, key=variant_key(KEY, "gzip")).action == "store"


def test_an_index_page_vary_on_its_keyed_headers_is_stored() -> None:
    key = index_key("/pypi/\x00/pypi/simple/x/", "application/vnd.pypi.simple.v1+json")
    headers = {
        "content-length": "5",
        "content-type": "application/vnd.pypi.simple.v1+json",
        "vary": "Accept, Accept-Encoding",
    }
    assert _whole(headers, key=key, route=PYPI).action == "store"
    encoded = {**headers, "content-encoding": "gzip"}
    verdict = _whole(encoded, key=key, route=PYPI)
    assert (verdict.action, verdict.reason) == ("close", "encoded index page")


def test_stored_headers_leave_out_what_each_answer_recomputes() -> None:
    raw = httpx.Headers(
        {"content-length": "5", "age": "3", "content-range": "bytes 0-4/5", "etag": '"e"'}
    ).raw
    names = [name for name, _ in storable.stored_headers(raw)]
    assert "etag" in names
    assert not {"content-length", "age", "content-range"} & set(names)


def _slice(
    status: int, headers: dict[str, str], wanted: tuple[int, int, str | None] = (0, 9, None)
) -> storable.Slice:
    return storable.slice_(
        wanted,
        status,
        httpx.Headers(headers),
        max_object_bytes=LIMIT,
        sha256=None,
        room=lambda size: True,
    )


def test_a_slice_is_stored_from_the_206_of_exactly_its_bytes() -> None:
    verdict = _slice(206, {"content-range": "bytes 0-9/100", "etag": '"e"'})
    assert verdict.reason is None
    assert (verdict.length, verdict.validator) == (10, '"e"')


@pytest.mark.parametrize(
    ("status", "headers", "wanted", "reason", "passes"),
    [
        (200, {"etag": '"e"'}, (0, 9, '"e"'), "changed", False),
        (200, {"etag": '"e"'}, (0, 9, None), "no byte ranges", False),
        (206, {"content-range": "bytes 5-9/100", "etag": '"e"'}, (0, 9, None), None, False),
        (206, {"content-range": "bytes 0-9/100", "etag": '"f"'}, (0, 9, '"e"'), "changed", False),
        (206, {"content-range": "bytes 0-9/100", "etag": 'W/"e"'}, (0, 9, None), None, False),
        (206, {"content-range": "bytes 0-9/5000", "etag": '"e"'}, (0, 9, None), TOO_LARGE, True),
        (
            206,
            {"content-range": "bytes 0-9/100", "etag": '"e"', "cache-control": "private"},
            (0, 9, None),
            None,
            True,
        ),
    ],
)
def test_a_slice_not_stored_says_why_and_whether_its_object_passes(
    status: int,
    headers: dict[str, str],
    wanted: tuple[int, int, str | None],
    reason: str | None,
    passes: bool,
) -> None:
    verdict = _slice(status, headers, wanted)
    assert verdict.reason is not None
    if reason is not None:
        assert verdict.reason == reason
    assert verdict.passes_object is passes


def _stored(cache_control: str) -> Meta:
    return Meta(
        key=KEY,
        url="http://upstream.test/f",
        headers=[("etag", '"e"'), ("cache-control", cache_control)],
        length=5,
        stored_at=0.0,
        initial_age=0.0,
        lifetime=60.0,
        validator='"e"',
        complete=True,
    )


def test_a_304_refreshes_the_stored_headers_and_lifetime() -> None:
    headers = httpx.Headers({"etag": '"e"', "cache-control": "max-age=600"})
    meta = storable.refreshed(
        _stored("max-age=60"), headers, 100.0, key=KEY, route=ROUTE, declared_immutable=False
    )
    assert isinstance(meta, Meta)
    assert ("cache-control", "max-age=600") in meta.headers
    assert (meta.stored_at, meta.lifetime, meta.length) == (100.0, 600.0, 5)


def test_a_304_that_makes_the_response_private_withdraws_it() -> None:
    headers = httpx.Headers({"etag": '"e"', "cache-control": "private"})
    reason = storable.refreshed(
        _stored("max-age=60"), headers, 100.0, key=KEY, route=ROUTE, declared_immutable=False
    )
    assert isinstance(reason, str)
