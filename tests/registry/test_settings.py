"""An oci route's settings (relay.config): checked at startup, credentials resolved from the
environment and never shown."""

from __future__ import annotations

import pytest

from relay import Config, Route
from relay.errors import ConfigError
from tests.registry.mirror import oci_route


def test_an_oci_route_follows_redirects_and_mirrors_its_upstream_host_by_default() -> None:
    route = Route(prefix="/r/", upstream="https://registry.test:5000", preset="oci")
    assert route.redirects == "follow"
    assert route.registry_hosts == ("registry.test:5000",)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"auth_env": "X"}, "username_env"),
        ({"forward_client_auth": True}, "username_env"),
        ({"username_env": "U"}, "both"),
        ({"tag_max_age": -1.0}, "tag_max_age"),
        ({"registry_hosts": ("Not a host",)}, "registry_hosts"),
        ({"upstream": "https://registry.test/sub/"}, "no path"),
    ],
)
def test_oci_route_keys_are_checked(keys: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        oci_route(**keys)  # type: ignore[arg-type]


def test_one_default_registry_and_v2_belongs_to_the_registry() -> None:
    with pytest.raises(ConfigError, match="more than one"):
        Config(
            routes=(
                oci_route("/a/", registry_default=True),
                oci_route("/b/", registry_default=True),
            )
        )
    with pytest.raises(ConfigError, match="/v2/"):
        Config(routes=(oci_route("/a/"), Route(prefix="/v2/x/", upstream="https://x.test/")))
    with pytest.raises(ConfigError, match="preset = 'oci'"):
        Config(routes=(Route(prefix="/a/", upstream="https://x.test/", registry_default=True),))


def test_registry_credentials_come_from_the_environment_and_are_masked() -> None:
    route = oci_route(username_env="U", password_env="P")
    with pytest.raises(ConfigError, match="P is not set"):
        route.resolve_credential({"U": "user"})
    resolved = route.resolve_credential({"U": "user", "P": "hunter2"})
    assert resolved.registry_credential == ("user", "hunter2")
    assert "hunter2" not in repr(resolved)
    assert resolved.describe()["registry_credential"] == "***"
    assert route.describe()["registry_credential"] is None


def test_an_oci_route_from_toml(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    path = tmp_path / "relay.toml"
    path.write_text(
        '[[routes]]\nprefix = "/dockerhub/"\nupstream = "https://registry-1.docker.io"\n'
        'preset = "oci"\nregistry_hosts = ["docker.io"]\nregistry_default = true\n'
        'redirect_hosts = ["production.cloudflare.docker.com"]\ntag_max_age = 600\n'
    )
    (route,) = Config.load(config_file=path).routes
    assert route.registry_hosts == ("docker.io",)
    assert route.tag_max_age == 600.0
    assert route.registry_default
