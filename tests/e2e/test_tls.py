"""End to end over TLS: an https upstream (the test origin with a trustme certificate). Bytes
unchanged, truncation visible, nothing left checked out, the certificate
checked against `ca_file`, and a slow client's bound holds over TLS too."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import httpx
import pytest
import trustme

from relay.net.transports.aiohttp_transport import READ_BUFSIZE
from relay.net.transports.reads import SMALL_READ
from tests.harness import (
    RelayThread,
    held_for_a_slow_client,
    relay_config,
    running_relay,
    sha256_stream,
)
from tests.origin import Origin, expected_sha256

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_origin(ca: trustme.CA) -> Iterator[Origin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    with Origin(tls=context) as origin:
        yield origin


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def tls_relay(tls_origin: Origin, ca_file: str) -> Iterator[RelayThread]:
    config = relay_config(
        tls_origin.url,
        ca_file=ca_file,
        resume_attempts=0,  # a cut body is aborted, not resumed (tested elsewhere)
    )
    with running_relay(config) as relay:
        yield relay


def test_https_upstream_body_is_byte_exact(tls_relay: RelayThread, tls_origin: Origin) -> None:
    assert tls_origin.url.startswith("https://")
    size = 64 * MiB
    with (
        httpx.Client(timeout=60) as client,
        client.stream("GET", f"{tls_relay.url}/o/gen/{size}") as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-length"] == str(size)
        digest, received = sha256_stream(response)
    assert (digest, received) == (expected_sha256(size), size)
    assert tls_relay.settled()


@pytest.mark.parametrize("fault", ["close_after=300000", "chunked_die=300000"])
def test_https_upstream_dying_mid_body_aborts_the_client(
    tls_relay: RelayThread, fault: str
) -> None:
    received = bytearray()
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{tls_relay.url}/o/gen/{4 * MiB}?{fault}") as response,
    ):
        for chunk in response.iter_raw():
            received += chunk
    assert len(received) == 300000
    assert tls_relay.settled()


def test_an_untrusted_certificate_is_a_502_without_ca_file(tls_origin: Origin) -> None:
    config = relay_config(tls_origin.url)
    with running_relay(config) as relay:
        response = httpx.get(f"{relay.url}/o/gen/10", timeout=10)
        assert response.status_code == 502
        assert relay.settled()


def test_a_slow_client_holds_little_over_tls_too(tls_origin: Origin, ca_file: str) -> None:
    config = relay_config(tls_origin.url, ca_file=ca_file)
    with running_relay(config) as relay:
        upstream, downstream = held_for_a_slow_client(relay)
        assert upstream > 0, "the probe measured nothing upstream"
        assert upstream <= 2 * READ_BUFSIZE + SMALL_READ
        assert 0 < downstream <= SMALL_READ
        assert relay.settled()
