"""End to end: credentials stay with their origin, signatures bind the whole request, and
what relay says about failures names the cause without internal addresses or secrets."""

from __future__ import annotations

import logging
import socket
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from relay.cli import main
from relay.config import Config, Route
from relay.net.upstream import Upstream
from relay.server.auth import sign
from tests.harness import RelayThread, raw_http, status_of
from tests.origin import Origin

pytestmark = pytest.mark.e2e

SECRET = "Bearer s3cret-token"


@pytest.fixture(scope="module")
def other_origin() -> Iterator[Origin]:
    """A second service on the same host, another port: another origin."""
    with Origin() as server:
        yield server


def follow_route(origin: Origin, **options: object) -> tuple[Route, ...]:
    return (
        Route(
            prefix="/o/",
            upstream=origin.url + "/",
            allow_private=True,
            redirects="follow",
            redirect_hosts=("127.0.0.1", "localhost"),
            **options,  # type: ignore[arg-type]
        ),
    )


def redirect_path(to: str) -> str:
    return "/o/redirect?to=" + urllib.parse.quote(to, safe="")


def echoed(response: httpx.Response) -> dict[str, list[str]]:
    """The headers the echoing service received, by lower-case name."""
    assert response.status_code == 200, response.text
    out: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        out.setdefault(name.lower(), []).append(value)
    return out


def record_for(origin: Origin, marker: str) -> dict[str, list[str]]:
    record = next(r for r in origin.requests if marker in r.target)
    return {name: record.header_all(name) for name in ("authorization", "cookie")}


# -- finding 2: followed redirects keep credentials to the same origin ---------------------


def test_route_credential_follows_a_redirect_to_the_same_origin_only(
    make_relay: Callable[..., RelayThread], origin: Origin, other_origin: Origin
) -> None:
    """Same host, other port: the route's credential is not sent (nor echoed back)."""
    relay = make_relay(routes=follow_route(origin, credential=SECRET))
    marker = uuid.uuid4().hex
    other = httpx.get(relay.url + redirect_path(f"{other_origin.url}/echo?m={marker}"))
    assert "authorization" not in echoed(other)
    assert record_for(other_origin, marker)["authorization"] == []
    assert SECRET not in other.text
    same = httpx.get(relay.url + redirect_path(f"{origin.url}/echo?m={marker}s"))
    assert echoed(same)["authorization"] == [SECRET]
    assert relay.settled()


async def test_route_credential_is_dropped_on_a_scheme_change() -> None:
    """https on the same host and port is another origin: the credential stays behind."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        if request.url.path == "/start":
            return httpx.Response(302, headers={"Location": "https://a.test:80/next"})
        return httpx.Response(200, content=b"ok")

    route = Route(
        prefix="/o/",
        upstream="http://a.test/",
        redirects="follow",
        redirect_hosts=("a.test",),
        credential=SECRET,
    )
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        upstream = Upstream(client, Config(routes=(route,)))
        request = upstream.build_request(
            "GET", "http://a.test/start", [("Authorization", SECRET), ("Cookie", "a=1")], route
        )
        response = await upstream.open(request, route)
        await response.aclose()
    assert [str(r.url) for r in sent] == ["http://a.test/start", "https://a.test:80/next"]
    assert sent[0].headers["authorization"] == SECRET
    assert "authorization" not in sent[1].headers
    assert "cookie" not in sent[1].headers
    assert sent[1].headers["host"] == "a.test:80"


def test_forwarded_client_credentials_stay_with_the_origin(
    make_relay: Callable[..., RelayThread], origin: Origin, other_origin: Origin
) -> None:
    """forward_client_auth: Cookie and Authorization go to the same origin, not elsewhere."""
    relay = make_relay(routes=follow_route(origin, forward_client_auth=True))
    client = {"Authorization": "Basic dTpw", "Cookie": "session=abc"}
    marker = uuid.uuid4().hex
    for target in (
        f"{other_origin.url}/echo?m={marker}a",
        f"http://localhost:{origin.port}/echo?m={marker}b",
    ):
        response = httpx.get(relay.url + redirect_path(target), headers=client)
        seen = echoed(response)
        assert "authorization" not in seen
        assert "cookie" not in seen
    assert record_for(other_origin, marker + "a") == {"authorization": [], "cookie": []}
    same = httpx.get(relay.url + redirect_path(f"{origin.url}/echo?m={marker}c"), headers=client)
    assert echoed(same)["authorization"] == ["Basic dTpw"]
    assert echoed(same)["cookie"] == ["session=abc"]


# -- finding 9: malformed Location ------------------------------------------------------------


MALFORMED = ["http://[::1", "http://h\\@127.0.0.1/", "http://127.0.0.1:99999/", "http://%zz/"]


@pytest.mark.parametrize("location", MALFORMED)
def test_followed_malformed_location_is_a_502(
    make_relay: Callable[..., RelayThread], origin: Origin, location: str
) -> None:
    relay = make_relay(routes=follow_route(origin))
    response = httpx.get(relay.url + redirect_path(location))
    assert response.status_code == 502
    assert "redirect not followed" in response.text
    assert "Traceback" not in response.text
    assert relay.settled()


@pytest.mark.parametrize("location", MALFORMED)
def test_passed_malformed_location_reaches_the_client_unchanged(
    make_relay: Callable[..., RelayThread], location: str
) -> None:
    relay = make_relay()
    response = raw_http(
        relay.port,
        f"GET {redirect_path(location)} HTTP/1.1\r\nHost: r\r\nConnection: close\r\n\r\n".encode(),
    )
    assert status_of(response) == 302
    head = response.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    locations = [
        line.split(b":", 1)[1].strip() for line in head if line.lower().startswith(b"location:")
    ]
    assert locations == [location.encode()]


# -- finding 3: signatures bind method, path and query -------------------------------------------


def test_signed_url_is_bound_to_its_query(
    make_relay: Callable[..., RelayThread], origin: Origin
) -> None:
    relay = make_relay(signing_key="k3y")
    marker = uuid.uuid4().hex
    path = "/o/gen/10"
    future = int(time.time()) + 600
    signed = sign("k3y", path, future, query=f"m={marker}&version=1")
    good = f"{relay.url}{path}?m={marker}&version=1&{signed}"
    assert httpx.get(good).status_code == 200
    assert httpx.get(good.replace("version=1", "version=2")).status_code == 403
    assert httpx.get(f"{relay.url}{path}?{signed}").status_code == 403
    assert httpx.get(f"{relay.url}{path}?m={marker}&{signed}").status_code == 403
    assert httpx.get(f"{relay.url}{path}?version=1&m={marker}&{signed}").status_code == 403
    assert httpx.get(f"{good}&extra=1").status_code == 403
    assert [r.target for r in origin.requests if marker in r.target] == [
        f"/gen/10?m={marker}&version=1"
    ]


def test_get_signature_serves_head_but_no_other_method(
    make_relay: Callable[..., RelayThread], origin: Origin, tmp_path: Path
) -> None:
    relay = make_relay(signing_key="k3y", data_dir=str(tmp_path))
    future = int(time.time()) + 600
    marker = uuid.uuid4().hex
    path = "/o/gen/10"
    query = f"m={marker}"
    get_url = f"{relay.url}{path}?{query}&{sign('k3y', path, future, query=query)}"
    assert httpx.head(get_url).status_code == 200
    assert httpx.get(get_url).status_code == 200

    # A job, created with a POST signature.
    post_sig = sign("k3y", "/downloads", future, method="POST")
    created = httpx.post(f"{relay.url}/downloads?{post_sig}", json={"path": f"{path}?{query}"})
    assert created.status_code in (200, 202), created.text
    job = created.json()["id"]
    # A GET signature for the job does not delete it; nor does one for GET /downloads post.
    get_sig = sign("k3y", f"/downloads/{job}", future)
    assert httpx.get(f"{relay.url}/downloads/{job}?{get_sig}").status_code == 200
    assert httpx.delete(f"{relay.url}/downloads/{job}?{get_sig}").status_code == 403
    list_sig = sign("k3y", "/downloads", future)
    assert httpx.get(f"{relay.url}/downloads?{list_sig}").status_code == 200
    other = {"path": f"/o/gen/20?m={marker}x"}
    assert httpx.post(f"{relay.url}/downloads?{list_sig}", json=other).status_code == 403
    assert not [r for r in origin.requests if f"{marker}x" in r.target]
    assert httpx.get(f"{relay.url}/downloads/{job}?{get_sig}").status_code == 200
    delete_sig = sign("k3y", f"/downloads/{job}", future, method="DELETE")
    assert httpx.delete(f"{relay.url}/downloads/{job}?{delete_sig}").status_code in (200, 204)


def test_sign_command_binds_method_and_query(
    make_relay: Callable[..., RelayThread],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    relay = make_relay(signing_key="k3y")
    monkeypatch.setenv("RELAY_SIGNING_KEY", "k3y")
    assert main(["sign", "/o/gen/10?version=1"]) == 0
    signed = capsys.readouterr().out.strip()
    assert httpx.get(relay.url + signed).status_code == 200
    assert httpx.get(relay.url + signed.replace("version=1", "version=2")).status_code == 403
    assert main(["sign", "--method", "delete", "/o/gen/10?version=1"]) == 0
    delete_only = capsys.readouterr().out.strip()
    assert httpx.get(relay.url + delete_only).status_code == 403


# -- finding 10: bodies and configuration errors say little ----------------------------------


def test_refused_upstream_502_names_no_address(
    make_relay: Callable[..., RelayThread], origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    relay = make_relay(routes=(Route(prefix="/o/", upstream=f"http://localhost:{origin.port}/"),))
    with caplog.at_level(logging.WARNING):
        response = httpx.get(f"{relay.url}/o/gen/10")
    assert response.status_code == 502
    assert "egress policy" in response.text
    for detail in ("127.0.0.1", "::1", "localhost", str(origin.port), "resolves"):
        assert detail not in response.text
    assert "resolves to" in caplog.text  # the log keeps the detail


def test_unreachable_upstream_502_names_no_host_or_port(
    make_relay: Callable[..., RelayThread], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    relay = make_relay(
        routes=(Route(prefix="/o/", upstream=f"http://127.0.0.1:{port}/", allow_private=True),)
    )
    with caplog.at_level(logging.WARNING):
        response = httpx.get(f"{relay.url}/o/x")
    assert response.status_code == 502
    assert "cannot connect" in response.text
    assert "127.0.0.1" not in response.text
    assert str(port) not in response.text
    assert str(port) in caplog.text


def test_invalid_upstream_response_502_is_generic(relay: RelayThread) -> None:
    response = httpx.get(f"{relay.url}/o/gen/1000?bad_framing=dup_cl")
    assert response.status_code == 502
    assert "127.0.0.1" not in response.text
    assert "Traceback" not in response.text


@pytest.mark.parametrize(
    ("args", "secret"),
    [
        (["--route", "/o/=http://user:pw-s3cret@example.com/"], "pw-s3cret"),
        (["--route", "/o/=ftp://user:pw-s3cret@example.com/"], "pw-s3cret"),
        (["--route", "http://user:pw-s3cret@example.com/"], "pw-s3cret"),
    ],
)
def test_configuration_errors_mask_url_credentials(
    args: list[str], secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *args]) == 2
    err = capsys.readouterr().err
    assert "configuration error" in err
    assert secret not in err
    assert "***" in err


@pytest.mark.parametrize("name", ["signing_key", "client_secret", "admin_token"])
def test_configuration_errors_mask_secret_values(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f"{name} = 12345678\n")
    assert main(["serve", "--config", str(config), "--route", "/o/=https://example.com/"]) == 2
    err = capsys.readouterr().err
    assert name in err
    assert "12345678" not in err


def test_upstream_log_line_keeps_no_query_secrets(
    make_relay: Callable[..., RelayThread], origin: Origin, caplog: pytest.LogCaptureFixture
) -> None:
    relay = make_relay(routes=follow_route(origin))
    with caplog.at_level(logging.WARNING):
        response = httpx.get(relay.url + redirect_path("http://evil.example/x?token=t0ken"))
    assert response.status_code == 502
    assert "evil.example" not in response.text
    assert "t0ken" not in caplog.text
    assert "evil.example" in caplog.text
