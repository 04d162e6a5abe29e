"""What one fill shares between clients, end to end: a real relay under uvicorn in front of the
test origin. A fill is built from its key alone (no client's headers reach the answer every
client gets), its answer reaches every client waiting on it whatever the upstream said
(exactly one upstream request), and a purge covers what is being filled."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from relay.config import Route
from tests.e2e.caching import MakeRelay, caching_relay, data_files, hub_relay, settled
from tests.ecosystems import Answer, Hub, sha256
from tests.harness import RelayThread, wait_until
from tests.origin import Origin, body_bytes

pytestmark = pytest.mark.e2e

ATTACKER = "attacker.example"


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


def _links(origin: Origin) -> list[httpx.Headers]:
    return [httpx.Headers(r.headers) for r in origin.requests if r.path == "/links"]


@pytest.mark.parametrize("through", ["host", "trusted proxy"])
def test_cache_fill_never_carries_a_clients_host(
    origin: Origin, cached: Callable[..., RelayThread], through: str
) -> None:
    """An upstream that builds links from X-Forwarded-Host stores a page every client gets:
    the fill sends no client's host (nor X-Forwarded-For/-Proto, request id, User-Agent), so
    one request with `Host: attacker.example` (or a trusted proxy's X-Forwarded-Host) never
    sends later clients there."""
    if through == "host":
        relay = cached()
        poisoned = {"host": ATTACKER}
    else:
        relay = cached(trusted_proxies="127.0.0.1/32")
        poisoned = {"x-forwarded-host": ATTACKER, "x-forwarded-proto": "https"}
    origin.reset_stats()
    path = f"/o/links?v={through.replace(' ', '-')}"
    first = httpx.get(
        relay.url + path, headers={**poisoned, "user-agent": "evil/1", "x-request-id": "r-1"}
    )
    assert first.status_code == 200
    assert first.headers["cache-status"] == "relay; fwd=miss"
    settled(relay)
    second = httpx.get(relay.url + path)
    assert second.headers["cache-status"].startswith("relay; hit")
    assert ATTACKER not in second.text
    assert ATTACKER not in first.text  # the stored page is the same for everyone
    (fill,) = _links(origin)
    for name in ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-for", "x-request-id"):
        assert name not in fill, name
    assert fill["user-agent"].startswith("relay/")
    assert fill["via"] == "1.1 relay"
    assert fill["accept-encoding"] == "deflate,gzip"  # the key's variant of httpx's default


def test_cache_rewritten_index_page_never_depends_on_the_first_clients_host(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A pypi route's index page is stored as the upstream answered the fill (which names no
    client's host) and rewritten per request on the way out: each client's links point at the
    relay it reached, never at the host the first client claimed."""
    routes = (Route(prefix="/o/", upstream=origin.url + "/", allow_private=True, preset="pypi"),)
    relay = cached(routes=routes)
    origin.reset_stats()
    first = httpx.get(relay.url + "/o/links?v=index", headers={"host": ATTACKER})
    assert first.status_code == 200
    assert f"http://{ATTACKER}/o/gen/1k" in first.text  # its own answer, rewritten for it
    settled(relay)
    second = httpx.get(relay.url + "/o/links?v=index")
    assert second.headers["cache-status"].startswith("relay; hit")
    assert ATTACKER not in second.text
    assert f"{relay.url}/o/gen/1k" in second.text
    (fill,) = _links(origin)
    assert "x-forwarded-host" not in fill


def test_cache_hub_requests_carry_only_credentials_of_the_client(tmp_path: Path) -> None:
    """A Hub file's metadata request is per client, but its answer names the source of the one
    fill every client of that sha256 joins: it carries the client's credentials (where the
    route forwards them) and nothing else of the client; nor does the fill from the CDN."""
    hub = Hub()
    hub.token = "t0ken"
    with hub.hub, hub.cdn, hub_relay(hub, tmp_path, forward_client_auth=True) as relay:
        answer = httpx.get(
            f"{relay.url}/hf/{Hub.repo}/resolve/main/model.bin",
            headers={
                "host": ATTACKER,
                "authorization": "Bearer t0ken",
                "user-agent": "evil/1",
                "x-request-id": "r-2",
            },
        )
        assert answer.status_code == 200
        assert answer.content == hub.lfs["model.bin"]
        settled(relay)
    (metadata,) = hub.hub.headers
    (fill,) = hub.cdn.headers
    assert metadata["authorization"] == "Bearer t0ken"
    assert "authorization" not in fill  # another origin: never the client's credential
    for sent in (metadata, fill):
        for name in ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-for", "x-request-id"):
            assert name not in sent, name
        assert sent["user-agent"].startswith("relay/")


# ---- one upstream request, whatever it answers (items 10, 15) -----------------------------


def _gets_of(origin: Origin, path: str) -> int:
    return sum(1 for r in origin.requests if r.path == path and r.method == "GET")


def _together(
    relay: RelayThread,
    origin: Origin,
    gate: str,
    path: str,
    headers: list[dict[str, str]],
    *,
    upstream: int,
) -> list[httpx.Response]:
    """GET `path` (held by the origin at `gate`) with one client per `headers`, all at once:
    the gate opens once every client holds a stream slot and the origin has seen `upstream`
    requests for the path, so every client arrived while the upstream request was pending."""
    results: list[httpx.Response | BaseException] = [RuntimeError("no answer")] * len(headers)

    def client(i: int) -> None:
        try:
            results[i] = httpx.get(relay.url + path, headers=headers[i], timeout=30)
        except BaseException as exc:
            results[i] = exc

    origin.close_gate(gate)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(headers))]
    try:
        for thread in threads:
            thread.start()
        assert wait_until(lambda: relay.streams_active() == len(headers))
        upstream_path = path.split("?")[0].removeprefix("/o")
        assert wait_until(lambda: _gets_of(origin, upstream_path) >= upstream)
    finally:
        origin.open_gate(gate)
        for thread in threads:
            thread.join(30)
    answers = [r for r in results if isinstance(r, httpx.Response)]
    assert len(answers) == len(headers), results
    return answers


_FROM_FILL = "relay; fwd=miss; fwd-status={}"


@pytest.mark.parametrize(
    ("path", "status", "cache_status"),
    [
        ("/o/gen/64k?v=80&cc=no-store,max-age=0", 200, _FROM_FILL),
        ("/o/gen/64k?v=81&cc=private,max-age=60", 200, _FROM_FILL),
        ("/o/status/404?v=83", 404, _FROM_FILL),
        ("/o/gen/64k?v=82&http10=1", 200, _FROM_FILL),
        ("/o/gen/64k?v=79&cc=no-store&cl=0", 200, _FROM_FILL),
        # A Content-Length over the object limit: the fill's open response, relayed.
        ("/o/gen/2m?v=78", 200, None),
    ],
)
def test_cache_first_request_for_a_url_not_stored_is_sent_upstream_once(
    origin: Origin,
    cached: Callable[..., RelayThread],
    tmp_path: Path,
    path: str,
    status: int,
    cache_status: str | None,
) -> None:
    """A single-use URL whose answer the cache will not store (no-store, private, a 404, a
    body delimited by close or chunked, one over cache_max_object_bytes) costs the upstream
    exactly one request: the fill's answer is the client's, streamed from its file and never
    published, or, where the file cannot hold it, its open response relayed."""
    relay = cached(cache_max_object_bytes=1024 * 1024)
    origin.reset_stats()
    answer = httpx.get(relay.url + path)
    assert answer.status_code == status
    assert answer.headers.get("cache-status") == (
        cache_status.format(status) if cache_status else None
    )
    if status == 200:
        assert answer.content == body_bytes(2 * 1024 * 1024 if "2m" in path else 64 * 1024)
    else:
        assert answer.text == "404 Not Found\n"
        assert answer.headers["content-length"] == str(len(answer.content))
    settled(relay)
    assert _gets_of(origin, path.split("?")[0].removeprefix("/o")) == 1
    assert data_files(tmp_path / "cache") == []


def test_cache_eight_clients_after_a_503_cost_one_upstream_request(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """After one 503, eight concurrent clients of that URL cost the origin one more request,
    and each gets the 503 (no pass marker turns them into eight requests)."""
    relay = cached()
    origin.reset_stats()
    path = "/o/status/503?v=84&hold=herd"
    first = httpx.get(relay.url + path)
    assert first.status_code == 503
    settled(relay)
    answers = _together(relay, origin, "herd", path, [{}] * 8, upstream=2)
    assert [a.status_code for a in answers] == [503] * 8
    assert {a.text for a in answers} == {"503 Service Unavailable\n"}
    assert {a.headers["cache-status"] for a in answers} == {"relay; fwd=miss; fwd-status=503"}
    settled(relay)
    assert _gets_of(origin, "/status/503") == 2


def test_cache_a_shared_redirect_names_no_clients_host(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Two clients with different Host headers on one fill of a redirect that an upstream
    builds from X-Forwarded-Host: one upstream request, and both get the Location the fill's
    key alone produced (mapped onto relay's route), never the other client's host."""
    relay = cached()
    origin.reset_stats()
    path = "/o/links?v=85&redirect=1&hold=redirect"
    answers = _together(
        relay,
        origin,
        "redirect",
        path,
        [{"host": ATTACKER}, {"host": "mirror.example"}],
        upstream=1,
    )
    assert [a.status_code for a in answers] == [302, 302]
    assert {a.headers["location"] for a in answers} == {"/o/gen/1k"}
    settled(relay)
    assert _gets_of(origin, "/links") == 1


def test_cache_an_answer_for_one_client_is_not_shared(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A `private` answer goes to one of the clients waiting on its fill; the others are
    relayed each on their own (hit-for-pass), and so are later requests for a while."""
    relay = cached()
    origin.reset_stats()
    path = "/o/gen/64k?v=86&cc=private,max-age=60&hold=private"
    answers = _together(relay, origin, "private", path, [{}] * 3, upstream=1)
    assert all(a.content == body_bytes(64 * 1024) for a in answers)
    statuses = sorted(a.headers.get("cache-status", "-") for a in answers)
    assert statuses == ["-", "-", "relay; fwd=miss; fwd-status=200"]
    settled(relay)
    assert _gets_of(origin, "/gen/64k") == 3
    later = httpx.get(relay.url + path)
    assert "cache-status" not in later.headers  # relayed (pass)
    assert _gets_of(origin, "/gen/64k") == 4


# ---- a purge covers what is being filled (item 16) ----------------------------------------


@pytest.mark.parametrize("purge", ["key", "prefix"])
def test_cache_purge_during_a_fill_is_not_undone_by_it(
    origin: Origin, cached: Callable[..., RelayThread], purge: str
) -> None:
    """A purge while the object is being filled: the fill finishes serving its client, but
    never stores; the next GET is a miss (a second upstream request)."""
    relay = cached(admin_token="sesame")
    token = {"x-relay-admin-token": "sesame"}
    origin.reset_stats()
    path = f"/o/gen/256k?v={87 if purge == 'key' else 88}&hold=purge"

    def purged() -> None:
        if purge == "key":
            answer = httpx.delete(f"{relay.url}/cache{path}", headers=token)
        else:
            answer = httpx.post(
                f"{relay.url}/cache/purge", json={"prefix": "/o/gen/"}, headers=token
            )
        assert answer.status_code == 200
        assert answer.json() == {"purged": 1}  # the object being filled

    results: list[httpx.Response] = []
    origin.close_gate("purge")
    thread = threading.Thread(target=lambda: results.append(httpx.get(relay.url + path)))
    thread.start()
    try:
        assert wait_until(lambda: _gets_of(origin, "/gen/256k") == 1)
        assert wait_until(lambda: relay.streams_active() == 1)
        purged()
    finally:
        origin.open_gate("purge")
        thread.join(30)
    (first,) = results
    assert first.status_code == 200
    assert first.content == body_bytes(256 * 1024)
    settled(relay)
    again = httpx.get(relay.url + path)
    assert again.headers["cache-status"] == "relay; fwd=miss"
    assert again.content == body_bytes(256 * 1024)
    assert _gets_of(origin, "/gen/256k") == 2


def test_cache_hub_purge_by_sha256_covers_its_fill(tmp_path: Path) -> None:
    """`DELETE /cache/<hf route>/sha256/<hex>` while that object is being filled from the CDN:
    the client gets every byte, nothing is stored, the next GET fetches again."""
    hub = Hub()
    data = hub.lfs["model.bin"]
    pause = hub.pause = Answer(pause_after=64 * 1024)
    with hub.hub, hub.cdn:
        url = f"/hf/{Hub.repo}/resolve/main/model.bin"
        with hub_relay(hub, tmp_path, admin_token="sesame") as relay:
            results: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: results.append(httpx.get(relay.url + url)))
            thread.start()
            try:
                assert pause.reached.wait(30)
                purge = httpx.delete(
                    f"{relay.url}/cache/hf/sha256/{sha256(data)}",
                    headers={"x-relay-admin-token": "sesame"},
                )
                assert purge.json() == {"purged": 1}
            finally:
                pause.release.set()
                thread.join(30)
            assert [r.content == data for r in results] == [True]
            settled(relay)
            again = httpx.get(relay.url + url)
            assert again.headers["cache-status"] == "relay; fwd=miss"
            assert again.content == data
            settled(relay)
    cdn_gets = [method for method, _, _ in hub.cdn.requests].count("GET")
    assert cdn_gets == 2
