"""Client authentication: shared secret and signed expiring URLs, checked without upstream."""

from __future__ import annotations

from typing import Any

import pytest

from relay.cli import main
from relay.errors import Forbidden, Unauthorized
from relay.server.auth import ClientAuth, sign


def scope(path: str, query: bytes = b"", headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {
        "path": path,
        "raw_path": path.encode(),
        "query_string": query,
        "headers": headers or [],
    }


def test_signed_url_is_accepted_until_it_expires_and_params_are_stripped() -> None:
    auth = ClientAuth(signing_key="k", clock=lambda: 1000.0)
    s = scope("/gh/a.tgz", f"x=1&{sign('k', '/gh/a.tgz', 1001, query='x=1&y=2')}&y=2".encode())
    auth.check(s)
    assert s["query_string"] == b"x=1&y=2"
    with pytest.raises(Forbidden, match="expired"):
        ClientAuth(signing_key="k", clock=lambda: 1002.0).check(
            scope("/gh/a.tgz", sign("k", "/gh/a.tgz", 1001).encode())
        )


@pytest.mark.parametrize(
    "query",
    [
        b"expires=1001&signature=00",
        b"signature=abc",
        b"expires=1001&expires=1002&signature=abc",
        b"expires=-1&signature=abc",
    ],
)
def test_bad_signatures_are_forbidden(query: bytes) -> None:
    with pytest.raises(Forbidden):
        ClientAuth(signing_key="k", clock=lambda: 1000.0).check(scope("/gh/a", query))


def test_signature_is_bound_to_the_path() -> None:
    query = sign("k", "/gh/a", 2000).encode()
    with pytest.raises(Forbidden, match="bad signature"):
        ClientAuth(signing_key="k", clock=lambda: 1000.0).check(scope("/gh/b", query))


def test_missing_credentials_are_unauthorized_and_secret_compared() -> None:
    auth = ClientAuth(secret="s", secret_header="X-Relay-Secret")
    with pytest.raises(Unauthorized):
        auth.check(scope("/gh/a"))
    with pytest.raises(Forbidden):
        auth.check(scope("/gh/a", headers=[(b"x-relay-secret", b"t")]))
    auth.check(scope("/gh/a", headers=[(b"x-relay-secret", b"s")]))
    assert not ClientAuth().enabled


def test_sign_command_prints_a_url_the_relay_accepts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_SIGNING_KEY", "k3y")
    assert main(["sign", "/gh/a.tgz?x=1", "--expires-in", "60"]) == 0
    path, _, query = capsys.readouterr().out.strip().partition("?")
    s = scope(path, query.encode())
    ClientAuth(signing_key="k3y").check(s)
    assert s["query_string"] == b"x=1"
