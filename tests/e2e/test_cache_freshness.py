"""Freshness end to end: what a revalidation's answer does to the stored response (RFC 9111
4.3.4), what a miss's Cache-Status claims, clients waiting on a revalidation while their
object is purged or evicted, and conditional requests answered from slices. A real relay
under uvicorn, in front of the test origin or of a scripted upstream that says exactly what
the test wants (a lying 304)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from relay.config import Route
from tests.e2e.caching import MakeRelay, caching_relay, data_files
from tests.e2e.caching import cache_metrics as _cache_metrics
from tests.e2e.caching import settled as _settled
from tests.harness import RelayThread, relay_config, running_relay, wait_until
from tests.origin import Origin, expected_sha256
from tests.scripted_upstream import Reply, ScriptedUpstream

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture
def cached(make_relay: MakeRelay, tmp_path: Path) -> Callable[..., RelayThread]:
    return caching_relay(make_relay, tmp_path)


@pytest.fixture
def scripted() -> Iterator[ScriptedUpstream]:
    with ScriptedUpstream() as upstream:
        yield upstream


@contextlib.contextmanager
def _scripted_relay(upstream: ScriptedUpstream, tmp_path: Path) -> Iterator[RelayThread]:
    config = relay_config(
        upstream.url,
        routes=(Route(prefix="/u/", upstream=upstream.url + "/", allow_private=True),),
        cache_dir=str(tmp_path / "cache"),
        cache_max_bytes=64 * MiB,
    )
    with running_relay(config) as relay:
        yield relay


def _response(status: str, body: bytes = b"", **headers: str) -> Reply:
    lines = [f"HTTP/1.1 {status}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    if not status.startswith("304"):
        lines.append(f"Content-Length: {len(body)}")
    return Reply([("\r\n".join(lines) + "\r\n\r\n").encode() + body])


def _sent(upstream: ScriptedUpstream, path: str) -> list[bytes]:
    return [r.raw.lower() for r in upstream.received if r.target == path.encode()]


# ---- item 3: a 304 refreshes only the response whose validator it names ----------------------

ONE = b"the first version, sixteen"
TWO = b"THE SECOND VERSION, SIXTEEN"


def test_a_304_naming_another_etag_never_relabels_the_stored_bytes(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    """Stored with ETag "e1", stale, revalidated: the upstream's 304 names "e2". The e1 bytes
    are not e2's: relay fetches the object once more, unconditionally, and answers e2's bytes
    under "e2"; a Range with If-Range "e2" is then cut from e2's bytes, from the cache."""
    scripted.script(
        "/f",
        _response("200 OK", ONE, ETag='"e1"', Cache_Control="max-age=0"),
        _response("304 Not Modified", ETag='"e2"', Cache_Control="max-age=600"),
        _response("200 OK", TWO, ETag='"e2"', Cache_Control="max-age=600"),
    )
    with _scripted_relay(scripted, tmp_path) as relay:
        first = httpx.get(relay.url + "/u/f")
        assert (first.content, first.headers["etag"]) == (ONE, '"e1"')
        _settled(relay)
        second = httpx.get(relay.url + "/u/f")
        assert (second.content, second.headers["etag"]) == (TWO, '"e2"')
        assert second.headers["cache-status"] == "relay; fwd=stale"
        _settled(relay)
        ranged = httpx.get(relay.url + "/u/f", headers={"range": "bytes=0-2", "if-range": '"e2"'})
        assert (ranged.status_code, ranged.content) == (206, TWO[:3])
        assert ranged.headers["cache-status"].startswith("relay; hit")
        whole = httpx.get(relay.url + "/u/f")
        assert (whole.content, whole.headers["etag"]) == (TWO, '"e2"')
    sent = _sent(scripted, "/f")
    assert len(sent) == 3
    assert b'if-none-match: "e1"' in sent[1]
    assert b"if-none-match" not in sent[2]


def test_a_304_adding_private_stops_the_object_being_shared(
    scripted: ScriptedUpstream, tmp_path: Path
) -> None:
    """A 304 that updates the stored response with `private`: a shared cache may not keep
    it. It was served as a hit for its new max-age; now the client that revalidated it is
    relayed (its own request, the upstream's answer) and so is the next one."""
    scripted.script(
        "/p",
        _response("200 OK", ONE, ETag='"e1"', Cache_Control="max-age=0"),
        _response("304 Not Modified", ETag='"e1"', Cache_Control="private, max-age=600"),
        _response("200 OK", ONE, ETag='"e1"', Cache_Control="private, max-age=600"),
    )
    with _scripted_relay(scripted, tmp_path) as relay:
        assert httpx.get(relay.url + "/u/p").content == ONE
        _settled(relay)
        for _ in range(2):
            relayed = httpx.get(relay.url + "/u/p")
            assert (relayed.status_code, relayed.content) == (200, ONE)
            assert "cache-status" not in relayed.headers
        _settled(relay)
    assert len(_sent(scripted, "/p")) == 4
    assert data_files(tmp_path / "cache") == []


# ---- item 5: a miss does not claim `stored` -----------------------------------------------------


def test_a_miss_cut_by_its_upstream_never_said_stored(
    origin: Origin, cached: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """The head of a miss goes out while its fill runs; the fill is then cut and stores
    nothing. Its Cache-Status said `relay; fwd=miss`, not `stored` (RFC 9211)."""
    relay = cached(resume_attempts=0)
    with (
        pytest.raises(httpx.TransportError),  # aborted: a reset or a short body
        httpx.stream("GET", f"{relay.url}/o/gen/2m?v=401&close_after=300000") as response,
    ):
        assert response.headers["cache-status"] == "relay; fwd=miss"
        for _ in response.iter_raw():
            pass
    _settled(relay)
    assert data_files(tmp_path / "cache") == []
    assert _cache_metrics(relay)["fills_failed_total"] == 1


# ---- item 6: entries dropped under a waiting revalidation --------------------------------------


def test_clients_waiting_on_a_revalidation_survive_a_purge(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """Three clients wait on the revalidation of a stale object (the origin holds the
    conditional request) when an admin purge drops it. The origin then says 304: each client
    gets the object's bytes (they were 503 `cached object unavailable, retry`); the purge
    stands, so the next request fetches the object again."""
    relay = cached(admin_token="sesame")
    path = "/o/gen/256k?v=403&cc=no-cache&gate=purged"
    assert httpx.get(relay.url + path).headers["cache-status"] == "relay; fwd=miss"
    _settled(relay)
    origin.close_gate("purged")
    origin.reset_stats()
    answers: list[httpx.Response] = []

    def client() -> None:
        answers.append(httpx.get(relay.url + path, timeout=30))

    threads = [threading.Thread(target=client) for _ in range(3)]
    try:
        for t in threads:
            t.start()
        assert wait_until(lambda: relay.streams_active() == 3 and len(origin.requests) == 1)
        purged = httpx.delete(f"{relay.url}/cache{path}", headers={"x-relay-admin-token": "sesame"})
        assert purged.json() == {"purged": 1}
    finally:
        origin.open_gate("purged")
        for t in threads:
            t.join(30)
    assert len(answers) == 3
    for answer in answers:
        assert answer.status_code == 200
        assert answer.headers["cache-status"] == "relay; fwd=stale; fwd-status=304"
        assert hashlib.sha256(answer.content).hexdigest() == expected_sha256(256 * 1024)
    assert origin.requests[0].header("if-none-match") is not None
    _settled(relay)
    after = httpx.get(relay.url + path)
    assert after.headers["cache-status"] == "relay; fwd=miss"
    assert origin.requests[-1].header("if-none-match") is None


# ---- item 7: conditional requests answered from slices ----------------------------------------


def test_ranges_from_slices_honour_the_clients_conditionals(
    origin: Origin, cached: Callable[..., RelayThread]
) -> None:
    """A range of a sliced object with an If-None-Match listing its ETag is a 304 (it was a
    206), as is one with an If-Modified-Since not older than its Last-Modified; an If-Range
    that does not hold gets the whole object, stitched from the slices."""
    relay = cached()
    size = 2 * MiB
    url = f"{relay.url}/o/gen/2m?v=404"
    first = httpx.get(url, headers={"range": f"bytes=0-{size - 1}"})
    assert first.status_code == 206
    etag = first.headers["etag"]
    _settled(relay)
    origin.reset_stats()
    for conditional in (
        {"if-none-match": f'"x", {etag}'},
        {"if-modified-since": first.headers["last-modified"]},
    ):
        not_modified = httpx.get(url, headers={"range": "bytes=100-199", **conditional})
        assert (not_modified.status_code, not_modified.content) == (304, b"")
        assert not_modified.headers["etag"] == etag
        assert not_modified.headers["cache-status"].startswith("relay; hit")
    other = httpx.get(url, headers={"range": "bytes=100-199", "if-range": '"old"'})
    assert other.status_code == 200
    assert hashlib.sha256(other.content).hexdigest() == expected_sha256(size)
    same = httpx.get(url, headers={"range": "bytes=100-199", "if-range": etag})
    assert (same.status_code, same.content) == (206, first.content[100:200])
    assert origin.requests == []  # every answer from the stored slices
