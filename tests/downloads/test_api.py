"""End to end: the /downloads API against a real relay and the test origin.

The helpers at the top are shared with test_downloads_resume.py and test_files.py.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import RelayThread, raw_http, relay_config, status_of, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

TERMINAL = ("completed", "failed", "cancelled")


def post(relay: RelayThread, **body: Any) -> httpx.Response:
    return httpx.post(f"{relay.url}/downloads", json=body, timeout=10)


def get_job(relay: RelayThread, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{relay.url}/downloads/{job_id}", timeout=10)
    assert response.status_code == 200, response.text
    job: dict[str, Any] = response.json()
    return job


def wait_for(
    relay: RelayThread,
    job_id: str,
    predicate: Callable[[dict[str, Any]], bool],
    *,
    timeout: float = 30,
) -> dict[str, Any]:
    """Poll the job until predicate(job) holds (bounded); return the job as last seen."""
    seen: dict[str, Any] = {}

    def check() -> bool:
        seen.update(get_job(relay, job_id))
        return predicate(seen)

    assert wait_until(check, timeout=timeout), f"job never got there: {seen}"
    return seen


def wait_done(relay: RelayThread, job_id: str, *, timeout: float = 30) -> dict[str, Any]:
    return wait_for(relay, job_id, lambda j: j["state"] in TERMINAL, timeout=timeout)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def partials(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "partial").iterdir())


def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def disk_relay(make_relay: Callable[..., RelayThread], tmp_path: Path) -> RelayThread:
    return make_relay(data_dir=str(tmp_path))


@pytest.fixture(scope="module")
def refusing_relay(
    origin: Origin, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RelayThread]:
    """One relay for the tests whose requests are all refused (they never start a job)."""
    relay = RelayThread(
        relay_config(origin.url, data_dir=str(tmp_path_factory.mktemp("refusing")))
    ).start()
    try:
        yield relay
    finally:
        relay.stop()


# ---- creating and completing -----------------------------------------------------------------


def test_download_completes_with_the_origin_sha256(disk_relay: RelayThread, tmp_path: Path) -> None:
    """A job fetches the body to files/{name}; its sha256 is the body's, the partial is gone."""
    size = 3 * 1024 * 1024 + 7
    response = post(disk_relay, path=f"/o/gen/{size}?m={marker()}", name="blob.bin")
    assert response.status_code == 202
    job_id = response.json()["id"]
    assert response.headers["location"] == f"/downloads/{job_id}"
    job = wait_done(disk_relay, job_id)
    assert job["state"] == "completed", job
    assert job["sha256"] == expected_sha256(size)
    assert job["bytes_done"] == job["total"] == size
    assert job["file"] == "/files/blob.bin"
    assert file_sha256(tmp_path / "files" / "blob.bin") == expected_sha256(size)
    assert partials(tmp_path) == []
    assert disk_relay.settled()


def test_download_job_json_has_the_documented_fields(disk_relay: RelayThread) -> None:
    """GET /downloads/{id} shows state, progress, rate, eta, attempts, error and timestamps."""
    job = post(disk_relay, path=f"/o/gen/1000?m={marker()}").json()
    assert set(job) >= {
        "id",
        "state",
        "path",
        "url",
        "name",
        "bytes_done",
        "total",
        "rate",
        "eta_seconds",
        "attempts",
        "error",
        "sha256",
        "created",
        "updated",
    }
    assert job["state"] in ("queued", "running", "completed")
    done = wait_done(disk_relay, job["id"])
    assert done["name"] == "1000"
    assert done["attempts"] == 1
    assert done["error"] is None
    assert "m=" not in done["path"]
    assert "m=" not in done["url"]


def test_download_by_url_maps_onto_the_route(disk_relay: RelayThread, origin: Origin) -> None:
    """A URL under a route's upstream base is accepted and fetched like its route path."""
    response = post(disk_relay, url=f"{origin.url}/gen/5000?m={marker()}", name="by-url")
    assert response.status_code == 202
    job = wait_done(disk_relay, response.json()["id"])
    assert job["state"] == "completed"
    assert job["path"] == "/o/gen/5000"
    assert job["sha256"] == expected_sha256(5000)


def test_download_duplicate_posts_share_one_job(disk_relay: RelayThread, origin: Origin) -> None:
    """The same object requested twice while running, and once more when done: one job."""
    tag = marker()
    body = {"path": f"/o/gen/1m?slow=2m&m={tag}", "name": "shared"}
    first = post(disk_relay, **body)
    second = post(disk_relay, **body)
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] == second.json()["id"]
    wait_done(disk_relay, first.json()["id"])
    third = post(disk_relay, **body)
    assert third.status_code == 200
    assert third.json()["id"] == first.json()["id"]
    assert third.json()["state"] == "completed"
    assert len([r for r in origin.requests if tag in r.target]) == 1


def test_download_max_downloads_queues_the_rest(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin
) -> None:
    """With max_downloads=1 a second job stays queued, untouched upstream, until the first ends."""
    relay = make_relay(data_dir=str(tmp_path), max_downloads=1)
    tag = marker()
    first = post(relay, path=f"/o/gen/1m?slow=2m&m={tag}", name="first").json()
    second = post(relay, path=f"/o/gen/2000?m={tag}", name="second").json()
    wait_for(relay, first["id"], lambda j: j["state"] == "running" and j["bytes_done"] > 0)
    assert get_job(relay, second["id"])["state"] == "queued"
    assert not [r for r in origin.requests if tag in r.target and "/gen/2000" in r.target]
    assert wait_done(relay, first["id"])["state"] == "completed"
    assert wait_done(relay, second["id"])["state"] == "completed"


def test_download_list_is_newest_first_and_bounded(disk_relay: RelayThread) -> None:
    """GET /downloads lists jobs newest first; ?limit bounds it; a bad limit is 400."""
    ids = [
        post(disk_relay, path=f"/o/gen/100?m={marker()}", name=f"n{i}").json()["id"]
        for i in range(3)
    ]
    listed = httpx.get(f"{disk_relay.url}/downloads").json()["downloads"]
    assert [j["id"] for j in listed] == ids[::-1]
    limited = httpx.get(f"{disk_relay.url}/downloads?limit=2").json()["downloads"]
    assert [j["id"] for j in limited] == ids[:0:-1]
    assert httpx.get(f"{disk_relay.url}/downloads?limit=0").status_code == 400
    for job_id in ids:
        wait_done(disk_relay, job_id)


# ---- cancelling and deleting -----------------------------------------------------------------


def test_download_delete_cancels_a_running_job(disk_relay: RelayThread, tmp_path: Path) -> None:
    """DELETE on a running job stops it, removes its partial and frees the upstream connection."""
    job = post(disk_relay, path=f"/o/gen/4m?slow=1m&m={marker()}", name="cancelled").json()
    wait_for(disk_relay, job["id"], lambda j: j["bytes_done"] > 0)
    response = httpx.delete(f"{disk_relay.url}/downloads/{job['id']}")
    assert response.status_code == 200
    assert response.json()["state"] == "cancelled"
    assert get_job(disk_relay, job["id"])["state"] == "cancelled"
    assert partials(tmp_path) == []
    assert not (tmp_path / "files" / "cancelled").exists()
    assert disk_relay.settled()


def test_download_delete_of_a_completed_job_removes_record_and_file(
    disk_relay: RelayThread, tmp_path: Path
) -> None:
    """DELETE on a finished job answers 204 and forgets it; its name can be downloaded again."""
    path = f"/o/gen/2000?m={marker()}"
    job = post(disk_relay, path=path, name="gone").json()
    wait_done(disk_relay, job["id"])
    assert (tmp_path / "files" / "gone").exists()
    assert httpx.delete(f"{disk_relay.url}/downloads/{job['id']}").status_code == 204
    assert httpx.get(f"{disk_relay.url}/downloads/{job['id']}").status_code == 404
    assert not (tmp_path / "files" / "gone").exists()
    again = post(disk_relay, path=path, name="gone")
    assert again.status_code == 202
    assert again.json()["id"] != job["id"]
    assert wait_done(disk_relay, again.json()["id"])["state"] == "completed"


def test_download_unknown_job_is_404(refusing_relay: RelayThread) -> None:
    """Unknown or malformed ids are 404 for GET and DELETE."""
    for job_id in (uuid.uuid4().hex, "nope", "..%2F"):
        assert httpx.get(f"{refusing_relay.url}/downloads/{job_id}").status_code == 404
        assert httpx.delete(f"{refusing_relay.url}/downloads/{job_id}").status_code == 404


# ---- names ---------------------------------------------------------------------------------


def test_download_name_of_a_different_existing_file_is_409(disk_relay: RelayThread) -> None:
    """A name held by a different published file is refused, unless the sha256 says it is it."""
    first = post(disk_relay, path=f"/o/gen/3000?m={marker()}", name="taken").json()
    wait_done(disk_relay, first["id"])
    other = post(disk_relay, path=f"/o/gen/4000?m={marker()}", name="taken")
    assert other.status_code == 409
    assert other.json()["field"] == "name"
    assert first["id"] in other.json()["error"]
    same = post(
        disk_relay, path=f"/o/gen/3000?m={marker()}", name="taken", sha256=expected_sha256(3000)
    )
    assert same.status_code == 200
    assert same.json()["id"] == first["id"]


def test_download_name_being_written_by_another_job_is_409(disk_relay: RelayThread) -> None:
    """Two different objects can never race to publish one name."""
    post(disk_relay, path=f"/o/gen/2m?slow=2m&m={marker()}", name="busy")
    response = post(disk_relay, path=f"/o/gen/1000?m={marker()}", name="busy")
    assert response.status_code == 409
    assert response.json()["field"] == "name"


@pytest.mark.parametrize(
    "name",
    ["../x", "..", ".", ".hidden", "a/b", "a\\b", "", "x" * 201, "é", "a b", "%2e%2e", "a\x00b"],
)
def test_download_unsafe_names_are_400(refusing_relay: RelayThread, name: str) -> None:
    """A name outside [A-Za-z0-9._-]{1,200} or with a leading dot is refused at once."""
    response = post(refusing_relay, path="/o/gen/10", name=name)
    assert response.status_code == 400
    assert response.json()["field"] == "name"


def test_download_default_name_comes_from_the_last_segment_sanitised(
    disk_relay: RelayThread,
) -> None:
    """Without "name", the last path segment is used with unsafe characters replaced."""
    job = post(disk_relay, path=f"/o/gen/100?x=%2F..&m={marker()}").json()
    assert job["name"] == "100"
    wait_done(disk_relay, job["id"])


# ---- refused input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"path": "/o/../etc/passwd"}, 400, "path"),
        ({"path": "/o/%2e%2e/x"}, 400, "path"),
        ({"path": "/o/a%2Fb"}, 400, "path"),
        ({"path": "//evil/x"}, 400, "path"),
        ({"path": "/nowhere/x"}, 404, "path"),
        ({"url": "http://evil.example/gen/10"}, 404, "url"),
        ({"url": "file:///etc/passwd"}, 404, "url"),
        ({"url": "not a url"}, 400, "url"),
        ({}, 422, "path"),
        ({"path": "/o/gen/10", "url": "http://x/"}, 422, "path"),
        ({"path": 5}, 422, "path"),
        ({"path": "/o/gen/10", "sha256": "xyz"}, 422, "sha256"),
        ({"path": "/o/gen/10", "size": -1}, 422, "size"),
        ({"path": "/o/gen/10", "size": True}, 422, "size"),
        ({"path": "/o/gen/10", "extra": 1}, 422, "extra"),
        ([], 422, "body"),
    ],
)
def test_download_bad_bodies_are_refused_naming_the_field(
    refusing_relay: RelayThread, body: Any, status: int, field: str
) -> None:
    """Refused input gets a short JSON error naming the field, never a stack trace."""
    response = httpx.post(f"{refusing_relay.url}/downloads", json=body)
    assert response.status_code == status
    error = response.json()
    assert error["field"] == field
    assert error["error"].startswith(f"{field}: ")
    assert "Traceback" not in response.text


def test_download_url_is_checked_like_a_path(refusing_relay: RelayThread, origin: Origin) -> None:
    """A URL under a route still goes through the traversal checks."""
    response = post(refusing_relay, url=f"{origin.url}/a/%2e%2e/%2e%2e/etc/passwd")
    assert response.status_code == 400
    assert response.json()["field"] == "url"


def test_download_needs_a_small_json_body(refusing_relay: RelayThread) -> None:
    """Not JSON: 415; malformed JSON: 400; larger than 16 KiB: 413."""
    url = f"{refusing_relay.url}/downloads"
    assert httpx.post(url, content=b"path=/o/x").status_code == 415
    bad = httpx.post(url, content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"] == "body: not valid JSON"
    nan = httpx.post(url, content=b'{"size": NaN}', headers={"content-type": "application/json"})
    assert nan.status_code == 400
    big = json.dumps({"path": "/o/" + "a" * 20000}).encode()
    assert (
        httpx.post(url, content=big, headers={"content-type": "application/json"}).status_code
        == 413
    )


def test_downloads_are_404_without_a_data_dir(make_relay: Callable[..., RelayThread]) -> None:
    """With data_dir empty the endpoints are not mounted; relaying is unaffected."""
    relay = make_relay()
    response = post(relay, path="/o/gen/10")
    assert response.status_code == 405  # the relay route serves GET and HEAD only
    assert httpx.get(f"{relay.url}/downloads").status_code == 404
    assert httpx.get(f"{relay.url}/files/x").status_code == 404
    assert httpx.get(f"{relay.url}/o/gen/10").status_code == 200


def test_download_methods_outside_the_api_are_405(refusing_relay: RelayThread) -> None:
    """Only the documented methods are routed."""
    assert httpx.put(f"{refusing_relay.url}/downloads").status_code == 405
    assert httpx.post(f"{refusing_relay.url}/files/x").status_code == 405
    reply = raw_http(
        refusing_relay.port, b"PATCH /downloads/x HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n"
    )
    assert status_of(reply) == 405
