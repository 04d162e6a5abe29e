"""The Hub's LFS files in the read-through cache, keyed by their sha256: a real relay in front
of the fake Hub and CDN (tests/ecosystems.py), counting the CDN's requests and body bytes."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from relay.config import Route
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.e2e.caching import disk_use
from tests.e2e.caching import hub_relay as _cached_relay
from tests.e2e.caching import settled as _settled
from tests.ecosystems import COMMIT, Answer, Hub, sha256
from tests.harness import CURL, curl, relay_config, running_relay, wait_until

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
URL = f"/hf/{Hub.repo}/resolve/main/"


@pytest.fixture
def hub() -> Iterator[Hub]:
    site = Hub()
    with site.hub, site.cdn:
        yield site


def _cdn_gets(hub: Hub) -> int:
    return [method for method, _, _ in hub.cdn.requests].count("GET")


def _assert_hub_metadata(response: httpx.Response, data: bytes, commit: str = COMMIT) -> None:
    assert response.headers["x-repo-commit"] == commit
    assert response.headers["x-linked-etag"] == f'"{sha256(data)}"'
    assert response.headers["x-linked-size"] == str(len(data))


def test_hub_lfs_file_is_fetched_once_then_answered_from_the_cache(
    hub: Hub, tmp_path: Path
) -> None:
    """An LFS file is filled once from the CDN, then every GET, Range, HEAD and conditional
    is answered from the cache with the Hub's metadata of that request."""
    data = hub.lfs["model.bin"]
    with _cached_relay(hub, tmp_path) as relay:
        first = httpx.get(relay.url + URL + "model.bin")
        second = httpx.get(relay.url + URL + "model.bin")
        ranged = httpx.get(relay.url + URL + "model.bin", headers={"range": "bytes=1000-1999"})
        head = httpx.head(relay.url + URL + "model.bin")
        etag = second.headers["etag"]
        conditional = httpx.get(relay.url + URL + "model.bin", headers={"if-none-match": etag})
        _settled(relay)
        metrics = _cache_metrics(relay)
    assert first.status_code == 200
    assert first.headers["cache-status"] == "relay; fwd=miss"
    assert first.headers["age"] == "0"
    assert sha256(first.content) == sha256(data)
    _assert_hub_metadata(first, data)
    assert second.status_code == 200
    assert second.headers["cache-status"] == "relay; hit"
    assert int(second.headers["age"]) >= 0
    assert second.headers["content-length"] == str(len(data))
    assert sha256(second.content) == sha256(data)
    _assert_hub_metadata(second, data)
    assert ranged.status_code == 206
    assert ranged.headers["cache-status"] == "relay; hit"
    assert ranged.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    assert ranged.content == data[1000:2000]
    _assert_hub_metadata(ranged, data)
    assert head.status_code == 200
    assert head.headers["cache-status"] == "relay; hit"
    assert head.headers["content-length"] == str(len(data))
    _assert_hub_metadata(head, data)
    assert conditional.status_code == 304
    assert conditional.content == b""
    _assert_hub_metadata(conditional, data)
    # The CDN sent the bytes once; the Hub was asked for metadata each time (a HEAD, unfollowed).
    assert _cdn_gets(hub) == 1
    assert hub.cdn.body_bytes == len(data)
    assert [m for m, p, _ in hub.hub.requests] == ["HEAD"] * 5
    assert (metrics["hits_total"], metrics["misses_total"]) == (4, 1)
    assert metrics["objects"] == 1
    assert metrics["size_bytes"] == disk_use(tmp_path / "cache")[0] > len(data)
    assert not hub.cdn.bypassed()


def test_hub_lfs_file_is_keyed_by_sha256_not_url(hub: Hub, tmp_path: Path) -> None:
    """The same bytes asked for at `main` and at the pinned commit are one cached object."""
    data = hub.lfs["model.bin"]
    with _cached_relay(hub, tmp_path) as relay:
        first = httpx.get(relay.url + URL + "model.bin")
        pinned = httpx.get(f"{relay.url}/hf/{Hub.repo}/resolve/{COMMIT}/model.bin")
        _settled(relay)
    assert first.headers["cache-status"] == "relay; fwd=miss"
    assert pinned.headers["cache-status"] == "relay; hit"
    assert sha256(pinned.content) == sha256(data)
    assert _cdn_gets(hub) == 1


def test_concurrent_hub_downloads_coalesce(hub: Hub, tmp_path: Path) -> None:
    """Three clients of one cold LFS file: one CDN fetch, every body exact."""
    data = hub.lfs["model.bin"]
    pause = hub.pause = Answer(pause_after=64 * 1024)
    results: list[bytes] = []
    with _cached_relay(hub, tmp_path) as relay:

        def download() -> None:
            results.append(httpx.get(relay.url + URL + "model.bin", timeout=30).content)

        threads = [threading.Thread(target=download) for _ in range(3)]
        for thread in threads:
            thread.start()
        try:
            assert pause.reached.wait(30)
            # Every client is attached to the one fill while the CDN holds the rest.
            assert wait_until(lambda: _cache_metrics(relay)["misses_total"] == 3, timeout=30)
        finally:
            pause.release.set()
            for thread in threads:
                thread.join(60)
        _settled(relay)
        metrics = _cache_metrics(relay)
    assert [sha256(body) for body in results] == [sha256(data)] * 3
    assert _cdn_gets(hub) == 1
    assert hub.cdn.body_bytes == len(data)
    assert metrics["coalesced_total"] == 2


def test_a_moved_branch_gets_the_new_bytes(hub: Hub, tmp_path: Path) -> None:
    """`main` moved to a new commit with other bytes: they are fetched and served, never the
    entry stored for the old commit."""
    old = hub.lfs["model.bin"]
    new = bytes(reversed(old))
    with _cached_relay(hub, tmp_path) as relay:
        before = httpx.get(relay.url + URL + "model.bin")
        hub.lfs["model.bin"] = new
        hub.commit = "f" * 40
        after = httpx.get(relay.url + URL + "model.bin")
        again = httpx.get(relay.url + URL + "model.bin")
        _settled(relay)
        metrics = _cache_metrics(relay)
    assert sha256(before.content) == sha256(old)
    assert after.headers["cache-status"] == "relay; fwd=miss"
    assert sha256(after.content) == sha256(new)
    _assert_hub_metadata(after, new, "f" * 40)
    assert again.headers["cache-status"] == "relay; hit"
    assert sha256(again.content) == sha256(new)
    _assert_hub_metadata(again, new, "f" * 40)
    assert _cdn_gets(hub) == 2
    assert metrics["objects"] == 2


@pytest.mark.skipif(CURL is None, reason="curl is not installed")
def test_cdn_bytes_that_do_not_match_the_sha256_are_never_served_clean(
    hub: Hub, tmp_path: Path
) -> None:
    """The CDN sends other bytes than X-Linked-Etag names: the client's transfer is aborted,
    nothing is stored, the mismatch is counted; a later good answer is fetched anew."""
    data = hub.lfs["model.bin"]
    hub.tampered[sha256(data)] = bytes(len(data))
    with _cached_relay(hub, tmp_path) as relay:
        code, _, size = curl(relay.url + URL + "model.bin")
        _settled(relay)
        metrics = _cache_metrics(relay)
        hub.tampered.clear()
        good = httpx.get(relay.url + URL + "model.bin")
        _settled(relay)
    assert code in (18, 56)
    assert size < len(data)
    assert metrics["digest_mismatches_total"] == 1
    assert metrics["objects"] == 0
    assert good.headers["cache-status"] == "relay; fwd=miss"
    assert sha256(good.content) == sha256(data)
    assert _cdn_gets(hub) == 2


def test_a_gated_repo_refuses_a_client_without_the_token_even_when_cached(
    hub: Hub, tmp_path: Path
) -> None:
    """The client's token goes to the Hub (never to the CDN); a client the Hub refuses gets the
    Hub's 401, not the bytes another client's token brought into the cache."""
    data = hub.lfs["model.bin"]
    hub.token = "s3cret"
    with _cached_relay(hub, tmp_path, forward_client_auth=True) as relay:
        allowed = httpx.get(
            relay.url + URL + "model.bin", headers={"authorization": "Bearer s3cret"}
        )
        anonymous = httpx.get(relay.url + URL + "model.bin")
        wrong = httpx.get(relay.url + URL + "model.bin", headers={"authorization": "Bearer x"})
        head = httpx.head(relay.url + URL + "model.bin")
        again = httpx.get(relay.url + URL + "model.bin", headers={"authorization": "Bearer s3cret"})
        _settled(relay)
    assert allowed.status_code == 200
    assert sha256(allowed.content) == sha256(data)
    assert (anonymous.status_code, wrong.status_code, head.status_code) == (401, 401, 401)
    assert anonymous.content == b"access to this repo is restricted\n"
    assert "cache-status" not in anonymous.headers
    assert again.headers["cache-status"] == "relay; hit"
    assert _cdn_gets(hub) == 1
    assert all("authorization" not in headers for headers in hub.cdn.headers)


def test_hub_answers_without_a_sha256_are_relayed(hub: Hub, tmp_path: Path) -> None:
    """A regular file (200 without X-Linked-Etag) and a missing one are relayed as without a
    cache; a HEAD of an LFS file not stored yet is relayed (no fill) with the Hub's metadata."""
    data = hub.lfs["model.bin"]
    with _cached_relay(hub, tmp_path) as relay:
        regular = httpx.get(relay.url + URL + "config.json")
        missing = httpx.get(relay.url + URL + "nope.bin")
        head = httpx.head(relay.url + URL + "model.bin")
        _settled(relay)
        metrics = _cache_metrics(relay)
    assert regular.status_code == 200
    assert regular.content == hub.regular
    assert regular.headers["x-repo-commit"] == COMMIT
    assert "cache-status" not in regular.headers
    assert missing.status_code == 404
    assert head.status_code == 200
    assert head.headers["content-length"] == str(len(data))
    _assert_hub_metadata(head, data)
    assert _cdn_gets(hub) == 0
    assert metrics["objects"] == 0


def test_a_hub_served_file_with_a_sha256_is_cached_without_xet_headers(
    hub: Hub, tmp_path: Path
) -> None:
    """A file the Hub answers itself (200) with a sha256 X-Linked-Etag is cached under that
    digest too; Xet's headers are withheld on hits as on relayed answers."""
    data = hub.lfs["xet.bin"]
    with _cached_relay(hub, tmp_path) as relay:
        first = httpx.get(relay.url + URL + "xet.bin")
        second = httpx.get(relay.url + URL + "xet.bin")
        _settled(relay)
    for answer in (first, second):
        assert sha256(answer.content) == sha256(data)
        _assert_hub_metadata(answer, data)
        assert not [h for h in answer.headers if h.startswith("x-xet-")]
        assert "xet-auth" not in answer.headers.get("link", "")
        assert 'rel="next"' in answer.headers["link"]
    assert first.headers["cache-status"] == "relay; fwd=miss"
    assert second.headers["cache-status"] == "relay; hit"
    gets = [p for m, p, _ in hub.hub.requests if m == "GET"]
    assert gets == [f"/{Hub.repo}/resolve/main/xet.bin"]


def test_a_redirect_to_a_host_not_allowed_is_a_502(hub: Hub, tmp_path: Path) -> None:
    """The fill follows the route's redirect policy: a CDN outside redirect_hosts is refused."""
    cdn = hub.cdn.url.split("//")[1].split(":")[0]
    with _cached_relay(hub, tmp_path, redirect_hosts=("cdn.example",)) as relay:
        got = httpx.get(relay.url + URL + "model.bin")
        _settled(relay)
    assert got.status_code == 502
    assert got.text == "502 redirect not followed: redirect to a host not in redirect_hosts\n"
    assert cdn not in got.text
    assert _cdn_gets(hub) == 0


def test_a_cold_range_of_a_hub_file_is_answered_from_slices(hub: Hub, tmp_path: Path) -> None:
    """A Range of an LFS file not stored whole is a 206 of exact bytes, fetched as a slice from
    the CDN (no credential), then a hit."""
    data = hub.lfs["model.bin"]
    with _cached_relay(hub, tmp_path) as relay:
        url = relay.url + URL + "model.bin"
        cold = httpx.get(url, headers={"range": "bytes=100-299"})
        _settled(relay)  # the slice's fill is published (the client had its bytes before)
        warm = httpx.get(url, headers={"range": "bytes=300-399"})
        _settled(relay)
    assert cold.status_code == warm.status_code == 206
    assert cold.content == data[100:300]
    assert warm.content == data[300:400]
    assert cold.headers["cache-status"] == "relay; fwd=miss"
    assert warm.headers["cache-status"] == "relay; hit"
    _assert_hub_metadata(warm, data)
    assert _cdn_gets(hub) == 1
    assert hub.cdn.ranges == [f"bytes=0-{MiB - 1}"]


def test_a_hub_error_is_relayed_even_when_the_file_is_cached(hub: Hub, tmp_path: Path) -> None:
    """Without the Hub's sha256 relay cannot know which bytes (or whether this client may
    have them): the Hub's 503 is relayed, never the stored object."""
    with _cached_relay(hub, tmp_path) as relay:
        assert httpx.get(relay.url + URL + "model.bin").status_code == 200
        _settled(relay)
        hub.hub.handle = lambda method, path, headers: Answer(503, b"hub is down\n")
        down = httpx.get(relay.url + URL + "model.bin")
        _settled(relay)
    assert down.status_code == 503
    assert down.content == b"hub is down\n"
    assert "cache-status" not in down.headers
    assert _cdn_gets(hub) == 1


def test_hub_files_are_prefetched_and_purged_by_sha256(hub: Hub, tmp_path: Path) -> None:
    """The admin prefetch of a Hub file stores it under its sha256; a purge of
    `<route>/sha256/<hex>` or of the route prefix drops it."""
    data = hub.lfs["model.bin"]
    admin = {"x-relay-admin-token": "sesame"}
    with _cached_relay(hub, tmp_path, admin_token="sesame") as relay:
        path = URL + "model.bin"
        started = httpx.post(relay.url + "/cache/prefetch", json={"path": path}, headers=admin)
        regular = httpx.post(
            relay.url + "/cache/prefetch", json={"path": URL + "config.json"}, headers=admin
        )
        assert wait_until(lambda: _cache_metrics(relay)["objects"] == 1)
        _settled(relay)
        again = httpx.post(relay.url + "/cache/prefetch", json={"path": path}, headers=admin)
        hit = httpx.get(relay.url + path)
        one = httpx.delete(f"{relay.url}/cache/hf/sha256/{sha256(data)}", headers=admin)
        miss = httpx.get(relay.url + path)
        _settled(relay)
        every = httpx.post(relay.url + "/cache/purge", json={"prefix": "/hf/"}, headers=admin)
        after = httpx.get(relay.url + path)
        _settled(relay)
    assert (started.status_code, started.json()) == (202, {"state": "filling"})
    assert regular.status_code == 400
    assert again.json() == {"state": "cached"}
    assert hit.headers["cache-status"] == "relay; hit"
    assert one.json() == {"purged": 1}
    assert miss.headers["cache-status"] == "relay; fwd=miss"
    assert every.json() == {"purged": 1}
    assert after.headers["cache-status"] == "relay; fwd=miss"
    assert sha256(after.content) == sha256(data)
    assert _cdn_gets(hub) == 3


def test_an_unreachable_hub_is_a_502_naming_no_address(tmp_path: Path) -> None:
    """The Hub's metadata request fails to connect: a 502 with a short body, no host:port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    routes = (
        Route(
            prefix="/hf/",
            upstream=dead + "/",
            allow_private=True,
            preset="hf",
            redirects="follow",
            redirect_hosts=("127.0.0.1",),
        ),
    )
    config = relay_config(
        dead, routes=routes, cache_dir=str(tmp_path / "c"), cache_max_bytes=64 * MiB
    )
    with running_relay(config) as relay:
        got = httpx.get(relay.url + URL + "model.bin")
        _settled(relay)
    assert got.status_code == 502
    assert got.text == "502 cannot connect to the upstream\n"


def test_a_client_gone_while_the_hub_is_asked_releases_everything(hub: Hub, tmp_path: Path) -> None:
    """The client leaves while relay waits for the Hub's metadata: the request to the Hub is
    cancelled, its stream slot and upstream connection released, nothing is filled."""
    answer = threading.Event()
    asked = threading.Event()
    serve = hub.hub.handle

    def slow(method: str, path: str, headers: dict[str, str]) -> Answer:
        asked.set()
        answer.wait(30)
        return serve(method, path, headers)

    hub.hub.handle = slow
    try:
        with _cached_relay(hub, tmp_path) as relay:
            with pytest.raises(httpx.ReadTimeout):
                httpx.get(relay.url + URL + "model.bin", timeout=httpx.Timeout(5, read=0.5))
            assert asked.is_set()
            assert wait_until(lambda: relay.streams_active() == 0)
            _settled(relay)
            metrics = _cache_metrics(relay)
    finally:
        answer.set()
    assert metrics["misses_total"] == 0
    assert _cdn_gets(hub) == 0


def test_the_fill_follows_further_cdn_redirects(hub: Hub, tmp_path: Path) -> None:
    """The CDN redirects again: the fill follows it (same redirect policy) and stores the bytes."""
    data = hub.lfs["model.bin"]
    hub.hop = True
    with _cached_relay(hub, tmp_path) as relay:
        first = httpx.get(relay.url + URL + "model.bin")
        second = httpx.get(relay.url + URL + "model.bin")
        _settled(relay)
    assert sha256(first.content) == sha256(second.content) == sha256(data)
    assert second.headers["cache-status"] == "relay; hit"
    _assert_hub_metadata(second, data)
    digest = sha256(data)
    assert [p for m, p, _ in hub.cdn.requests if m == "GET"] == [
        f"/hop/{digest}?sig=abc",
        f"/repos/{digest}?sig=abc",
    ]


@pytest.mark.parametrize("size", [100, 300_000])
def test_hits_of_a_cdn_fresh_hub_file_carry_this_answers_hub_metadata(
    hub: Hub, tmp_path: Path, size: int
) -> None:
    """The CDN says its bytes are fresh for a week (as the real one does): every hit, small
    (one read on the loop) or not, GET or HEAD, carries the Hub's metadata of this request
    (the moved branch's commit), no Xet header and no ttl."""
    hub.cdn_cache_control = "public, max-age=604800, immutable"
    data = hub.lfs["model.bin"][:size]
    hub.lfs["model.bin"] = data
    with _cached_relay(hub, tmp_path) as relay:
        first = httpx.get(relay.url + URL + "model.bin")
        hub.commit = "f" * 40  # the branch moves; the file's bytes stay the same
        get = httpx.get(relay.url + URL + "model.bin")
        head = httpx.head(relay.url + URL + "model.bin")
        _settled(relay)
    assert first.headers["cache-status"] == "relay; fwd=miss"
    for hit in (get, head):
        assert hit.status_code == 200
        assert hit.headers["cache-status"] == "relay; hit"
        assert hit.headers["content-length"] == str(len(data))
        _assert_hub_metadata(hit, data, commit="f" * 40)
    assert sha256(get.content) == sha256(data)
    assert _cdn_gets(hub) == 1


def test_a_whole_get_from_tampered_slices_is_never_ended_cleanly(hub: Hub, tmp_path: Path) -> None:
    """The CDN's ranges of a file are not its bytes (one bit flipped at the end): a cold Range
    stores slices; a whole GET answered from them is cut before its last byte (the object's
    sha256 is checked once every slice is stored), the slices are dropped."""
    data = bytes(range(256)) * (3 * MiB // 256)  # three slices
    hub.lfs["model.bin"] = data
    bad = bytearray(data)
    bad[-1] ^= 1
    hub.tampered[sha256(data)] = bytes(bad)
    with _cached_relay(hub, tmp_path) as relay:
        url = relay.url + URL + "model.bin"
        cold = httpx.get(url, headers={"range": "bytes=0-99"})
        _settled(relay)
        with pytest.raises(httpx.HTTPError):
            httpx.get(url)
        _settled(relay)
        metrics = _cache_metrics(relay)
    assert cold.status_code == 206
    assert metrics["digest_mismatches_total"] >= 1
    assert metrics["objects"] == 0
