"""End to end: the /downloads API needs the admin credential, and the store is bounded."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.cli import main
from relay.config import Config, Route
from relay.errors import ConfigError
from tests.downloads.test_api import file_sha256, partials
from tests.harness import RelayThread, wait_until
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

TOKEN = "adm1n-t0ken"
ADMIN = {"X-Relay-Admin-Token": TOKEN}
TERMINAL = ("completed", "failed", "cancelled")


def marker() -> str:
    return uuid.uuid4().hex


def post(relay: RelayThread, headers: dict[str, str] | None = ADMIN, **body: Any) -> httpx.Response:
    return httpx.post(f"{relay.url}/downloads", json=body, headers=headers, timeout=10)


def job_of(relay: RelayThread, job_id: str) -> httpx.Response:
    return httpx.get(f"{relay.url}/downloads/{job_id}", headers=ADMIN, timeout=10)


def wait_done(relay: RelayThread, job_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.update(job_of(relay, job_id).json())
        return seen["state"] in TERMINAL

    assert wait_until(done, timeout=30), seen
    return seen


@pytest.fixture
def admin_relay(make_relay: Callable[..., RelayThread], tmp_path: Path) -> RelayThread:
    return make_relay(data_dir=str(tmp_path), downloads_open=False, admin_token=TOKEN)


# -- the admin credential --------------------------------------------------------------------


def test_downloads_api_needs_the_admin_credential(
    admin_relay: RelayThread, origin: Origin, tmp_path: Path
) -> None:
    """Without it: 401 (none) or 403 (wrong) on every endpoint, nothing fetched or deleted."""
    m = marker()
    for headers in (None, {"X-Relay-Admin-Token": "wrong"}, {"X-Relay-Admin-Token": ""}):
        refused = post(admin_relay, headers=headers, path=f"/o/gen/100?m={m}", name="x.bin")
        assert refused.status_code == (401 if headers is None else 403), refused.text
        assert "error" in refused.json()
    assert not [r for r in origin.requests if m in r.target]

    created = post(admin_relay, path=f"/o/gen/100?m={m}", name="x.bin")
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert wait_done(admin_relay, job_id)["state"] == "completed"

    base = admin_relay.url
    assert httpx.get(f"{base}/downloads").status_code == 401
    assert httpx.get(f"{base}/downloads/{job_id}").status_code == 401
    assert httpx.delete(f"{base}/downloads/{job_id}").status_code == 401
    wrong = {"X-Relay-Admin-Token": TOKEN + "x"}
    assert httpx.delete(f"{base}/downloads/{job_id}", headers=wrong).status_code == 403
    assert (tmp_path / "files" / "x.bin").exists()
    # /files reads stay as they were: no admin credential needed.
    served = httpx.get(f"{base}/files/x.bin")
    assert served.status_code == 200
    assert served.content == (tmp_path / "files" / "x.bin").read_bytes()

    listed = httpx.get(f"{base}/downloads", headers=ADMIN)
    assert [j["id"] for j in listed.json()["downloads"]] == [job_id]
    assert httpx.delete(f"{base}/downloads/{job_id}", headers=ADMIN).status_code == 204
    assert not (tmp_path / "files" / "x.bin").exists()


def test_admin_token_is_never_logged_or_shown(
    make_relay: Callable[..., RelayThread], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        relay = make_relay(
            data_dir=str(tmp_path), downloads_open=False, admin_token=TOKEN, log_level="debug"
        )
        post(relay, path=f"/o/gen/10?m={marker()}")
        httpx.get(f"{relay.url}/downloads", headers={"X-Relay-Admin-Token": "wrong"})
    assert TOKEN not in caplog.text
    assert TOKEN not in repr(relay.config)
    assert TOKEN not in str(relay.config.describe())


def test_admin_token_file_and_custom_header(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    loaded = Config.load(
        cli={"data_dir": str(tmp_path / "data"), "admin_header": "X-Admin"},
        environ={"RELAY_ADMIN_TOKEN_FILE": str(token_file)},
    )
    assert loaded.admin_token == TOKEN
    relay = make_relay(data_dir=str(tmp_path / "data"), downloads_open=False, **_admin(loaded))
    assert httpx.get(f"{relay.url}/downloads", headers=ADMIN).status_code == 401
    assert httpx.get(f"{relay.url}/downloads", headers={"X-Admin": TOKEN}).status_code == 200


def _admin(config: Config) -> dict[str, str]:
    return {"admin_token": config.admin_token, "admin_header": config.admin_header}


def test_data_dir_without_admin_credential_refuses_to_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = (Route(prefix="/o/", upstream="https://example.com/"),)
    with pytest.raises(ConfigError, match="admin_token"):
        Config(routes=routes, data_dir=str(tmp_path))
    Config(routes=routes, data_dir=str(tmp_path), admin_token="t")
    Config(routes=routes, data_dir=str(tmp_path), downloads_open=True)
    with pytest.raises(ConfigError, match="admin_header"):
        Config(routes=routes, admin_token="t", admin_header="x-relay-secret")
    args = ["serve", "--route", "/o/=https://example.com/", "--data-dir", str(tmp_path)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "downloads_open" in err


def test_downloads_open_keeps_the_api_open(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """The explicit opt-out: no credential asked for, as before."""
    relay = make_relay(data_dir=str(tmp_path), downloads_open=True)
    response = post(relay, headers=None, path=f"/o/gen/10?m={marker()}")
    assert response.status_code == 202
    assert httpx.get(f"{relay.url}/downloads").status_code == 200


# -- quotas and retention ----------------------------------------------------------------------


def test_job_quota_answers_507_until_a_job_is_deleted(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    relay = make_relay(
        data_dir=str(tmp_path), downloads_open=False, admin_token=TOKEN, downloads_max_jobs=2
    )
    ids = []
    for i in range(2):
        created = post(relay, path=f"/o/gen/10?m={marker()}", name=f"f{i}")
        assert created.status_code == 202
        ids.append(created.json()["id"])
        wait_done(relay, ids[-1])
    full = post(relay, path=f"/o/gen/10?m={marker()}", name="f2")
    assert full.status_code == 507
    assert "downloads_max_jobs" in full.json()["error"]
    assert len(httpx.get(f"{relay.url}/downloads", headers=ADMIN).json()["downloads"]) == 2
    assert httpx.delete(f"{relay.url}/downloads/{ids[0]}", headers=ADMIN).status_code == 204
    assert post(relay, path=f"/o/gen/10?m={marker()}", name="f2").status_code == 202


def test_byte_quota_refuses_and_fails_what_does_not_fit(
    make_relay: Callable[..., RelayThread], tmp_path: Path, origin: Origin
) -> None:
    quota = 1024 * 1024
    relay = make_relay(
        data_dir=str(tmp_path), downloads_open=False, admin_token=TOKEN, downloads_max_bytes=quota
    )
    # Declared too large: refused before anything is fetched.
    m = marker()
    declared = post(relay, path=f"/o/gen/{2 * quota}?m={m}", size=2 * quota)
    assert declared.status_code == 507
    assert "downloads_max_bytes" in declared.json()["error"]
    assert not [r for r in origin.requests if m in r.target]
    # Announced too large by the upstream: the job fails, no file, no partial left.
    big = post(relay, path=f"/o/gen/{2 * quota}?m={marker()}", name="big.bin")
    assert big.status_code == 202
    job = wait_done(relay, big.json()["id"])
    assert job["state"] == "failed"
    assert "downloads_max_bytes" in job["error"]
    assert not (tmp_path / "files" / "big.bin").exists()
    assert partials(tmp_path) == []
    # What fits still completes, and then counts against the quota.
    size = quota - 1000
    fits = post(relay, path=f"/o/gen/{size}?m={marker()}", name="fits.bin")
    assert wait_done(relay, fits.json()["id"])["state"] == "completed"
    assert file_sha256(tmp_path / "files" / "fits.bin") == expected_sha256(size)
    over = post(relay, path=f"/o/gen/2000?m={marker()}", size=2000)
    assert over.status_code == 507


def test_finished_jobs_and_their_files_expire_after_retention(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    relay = make_relay(
        data_dir=str(tmp_path), downloads_open=False, admin_token=TOKEN, downloads_retention=0.5
    )
    created = post(relay, path=f"/o/gen/1000?m={marker()}", name="old.bin")
    job_id = created.json()["id"]
    seen: dict[str, Any] = {}

    def gone() -> bool:
        response = job_of(relay, job_id)
        if response.status_code == 200:
            seen.update(response.json())
        return response.status_code == 404

    assert wait_until(gone, timeout=30)
    assert seen.get("state") == "completed"  # it did finish before it expired
    assert not (tmp_path / "files" / "old.bin").exists()
    assert httpx.get(f"{relay.url}/downloads", headers=ADMIN).json()["downloads"] == []


def test_body_of_unannounced_length_is_stopped_past_the_byte_quota(
    make_relay: Callable[..., RelayThread], tmp_path: Path
) -> None:
    """Chunked, no length: the background check fails the job, its partial goes, the
    upstream connection is released."""
    quota = 1024 * 1024
    relay = make_relay(
        data_dir=str(tmp_path), downloads_open=False, admin_token=TOKEN, downloads_max_bytes=quota
    )
    path = f"/o/gen/{4 * quota}?cl=0&stall_after={2 * quota}&m={marker()}"
    created = post(relay, path=path, name="endless.bin")
    assert created.status_code == 202
    job = wait_done(relay, created.json()["id"])
    assert job["state"] == "failed"
    assert "downloads_max_bytes" in job["error"]
    assert job["bytes_done"] > quota
    assert not (tmp_path / "files" / "endless.bin").exists()
    assert partials(tmp_path) == []
    assert relay.settled()
