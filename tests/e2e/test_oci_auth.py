"""relay does the registry's token dance itself: against a real token-auth registry (trusting
the tests' issuer) with the route's own credentials, tokens reused; a client's credentials
never reach an upstream (tests/oci_world.py; issue 17)."""

from __future__ import annotations

import base64
from pathlib import Path

import httpx
import pytest

from tests.oci_clients import skopeo_copy, skopeo_list_tags
from tests.oci_fault_proxy import FaultProxy
from tests.oci_image import INDEX
from tests.oci_world import PULLER, ROUTE_PREFIX, OciLayoutFixture, TokenWorld, needs, oci_relay

pytestmark = pytest.mark.e2e

CLIENT_USER, CLIENT_SECRET = "intruder", "client-secret-7f3a"
CLIENT_BASIC = "Basic " + base64.b64encode(f"{CLIENT_USER}:{CLIENT_SECRET}".encode()).decode()
CLIENT_BEARER = "Bearer client-token-9c1e"
ENVIRON = {"OCI_USER": PULLER[0], "OCI_PASSWORD": PULLER[1]}
PULLER_BASIC = "Basic " + base64.b64encode(f"{PULLER[0]}:{PULLER[1]}".encode()).decode()


def _client_requests(relay_url: str, manifest_digest: str, blob_digest: str) -> None:
    """Manifest and blob requests carrying a client's own credentials, both kinds."""
    base = f"{relay_url}/v2/{ROUTE_PREFIX}/small"
    for auth in (CLIENT_BASIC, CLIENT_BEARER):
        headers = {"Authorization": auth, "Accept": INDEX}
        httpx.get(f"{base}/manifests/v1", headers=headers)
        httpx.get(f"{base}/manifests/{manifest_digest}", headers=headers)
        httpx.get(f"{base}/blobs/{blob_digest}", headers={"Authorization": auth})


def _leaked(values: list[str]) -> list[str]:
    return [v for v in values if CLIENT_SECRET in v or CLIENT_BEARER in v or CLIENT_USER in v]


@needs("docker-registry", "skopeo")
def test_relay_pulls_from_a_token_auth_registry_with_its_own_credentials_and_reuses_tokens(
    oci_layout: OciLayoutFixture,
    oci_token_world: TokenWorld,
    token_proxy: FaultProxy,
    oci_tmp: Path,
) -> None:
    issuer = oci_token_world.issuer
    v1 = oci_layout.v1
    with oci_relay(
        token_proxy.url,
        oci_tmp / "cache",
        environ=ENVIRON,
        username_env="OCI_USER",
        password_env="OCI_PASSWORD",
    ) as relay:
        ref = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}/small:v1"
        assert skopeo_copy(ref, oci_tmp / "a", workdir=oci_tmp, all_platforms=True) == (
            v1.top.digest
        )
        first = issuer.requests
        assert first, "relay never asked the issuer for a token"
        assert {r.account for r in first} == {PULLER[0]}
        assert {r.authorization for r in first} == {PULLER_BASIC}
        assert all(r.status == 200 for r in first)
        assert all(scope == "repository:small:pull" for r in first for scope in r.scopes)

        # More requests of the same scope that go upstream (tag lists are never cached):
        # the token relay holds is used again, the issuer is not asked.
        upstream_before = len(token_proxy.records)
        repo = f"127.0.0.1:{relay.port}/{ROUTE_PREFIX}/small"
        for _ in range(2):
            assert "v1" in skopeo_list_tags(repo, workdir=oci_tmp)
        assert token_proxy.count("GET", "/small/tags/list") == 2
        assert len(token_proxy.records) > upstream_before
        assert issuer.requests == first, "relay fetched a new token for a scope it held"

        _client_requests(relay.url, v1.manifests["amd64"].digest, v1.layers["amd64"][1].digest)
    # Upstream requests carry relay's bearer tokens only.
    seen = token_proxy.authorizations()
    assert seen
    assert all(v.startswith("Bearer ey") for v in seen), seen
    assert not _leaked(seen + [r.authorization or "" for r in issuer.requests])


@needs("docker-registry")
def test_client_credentials_never_reach_an_anonymous_upstream(
    oci_layout: OciLayoutFixture, fault_proxy: FaultProxy, oci_tmp: Path
) -> None:
    v1 = oci_layout.v1
    with oci_relay(fault_proxy.url, oci_tmp / "cache") as relay:
        _client_requests(relay.url, v1.manifests["amd64"].digest, v1.layers["amd64"][1].digest)
        # Misses, then hits: both kinds of answer seen with a credential.
        _client_requests(relay.url, v1.manifests["amd64"].digest, v1.layers["amd64"][1].digest)
    assert fault_proxy.records, "relay never asked the upstream"
    assert fault_proxy.authorizations() == []
    leaked = [r for r in fault_proxy.records if any(CLIENT_SECRET in v for v in r.headers.values())]
    assert not leaked


@needs("docker-registry", "skopeo")
def test_without_credentials_relay_pulls_anonymously_and_a_client_never_sees_the_challenge(
    oci_token_world: TokenWorld, token_proxy: FaultProxy, oci_tmp: Path
) -> None:
    """The issuer refuses anonymous tokens here: the client gets a registry error from relay
    (not the upstream's Bearer challenge, which would send it to the issuer itself)."""
    with oci_relay(token_proxy.url, oci_tmp / "cache") as relay:
        response = httpx.get(
            f"{relay.url}/v2/{ROUTE_PREFIX}/small/manifests/v1",
            headers={"Accept": INDEX, "Authorization": CLIENT_BASIC},
        )
        assert response.status_code >= 400
        assert response.json()["errors"]
        assert oci_token_world.issuer.realm not in response.headers.get("www-authenticate", "")
    assert not _leaked(token_proxy.authorizations())
    assert all(r.authorization is None for r in oci_token_world.issuer.requests)
