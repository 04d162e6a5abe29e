"""Configuration is validated once, names the bad key, and honours source precedence."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import main
from relay.config import Config, Mirror, Route, masked
from relay.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = Config()
    assert config.port == 8000
    assert config.transport == "aiohttp"
    assert config.routes == ()


def test_precedence_file_then_env_then_cli(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        'port = 9000\nread_timeout = 5\nhost = "0.0.0.0"\n'
        '[[routes]]\nprefix = "/f/"\nupstream = "https://file.example/"\n',
    )
    config = Config.load(
        cli={"port": "9002", "routes": None},
        environ={"RELAY_PORT": "9001", "RELAY_READ_TIMEOUT": "7.5"},
        config_file=path,
    )
    assert config.port == 9002
    assert config.read_timeout == 7.5
    assert config.host == "0.0.0.0"
    assert config.routes == (Route(prefix="/f/", upstream="https://file.example/"),)


def test_routes_come_whole_from_the_highest_source(tmp_path: Path) -> None:
    path = write(tmp_path, '[[routes]]\nprefix = "/f/"\nupstream = "https://file.example/"\n')
    env = {"RELAY_ROUTES": "/e/=https://env.example/ /e2/=https://env2.example/x"}
    config = Config.load(environ=env, config_file=path)
    assert [r.prefix for r in config.routes] == ["/e/", "/e2/"]
    assert config.routes[1].upstream == "https://env2.example/x/"
    config = Config.load(cli={"routes": ["/c/=https://cli.example/"]}, environ=env)
    assert [r.prefix for r in config.routes] == ["/c/"]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"RELAY_PORT": "eighty"}, "port (RELAY_PORT): expected int"),
        ({"RELAY_PORT": "70000"}, "port (RELAY_PORT): must be at most 65535"),
        ({"RELAY_READ_TIMEOUT": "0"}, "read_timeout (RELAY_READ_TIMEOUT): must be greater than 0"),
        ({"RELAY_TRANSPORT": "curl"}, "transport (RELAY_TRANSPORT): must be one of"),
        (
            {"RELAY_TRANSPORT": "httpcore"},
            "transport (RELAY_TRANSPORT): the httpcore transport was removed",
        ),
        ({"RELAY_PORT": "tcp://10.0.0.1:80"}, "enableServiceLinks"),
        ({"RELAY_ROUTES": "/x/"}, "expected PREFIX=URL"),
    ],
)
def test_env_errors_name_the_key(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.load(environ=environ)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prot = 1\n", "prot"),
        ('port = "x"\n', "port"),
        ("max_connections = 0\n", "max_connections"),
        ('[[routes]]\nprefix = "/a/"\n', "routes[0]"),
        ('[[routes]]\nprefix = "/a/"\nupstream = "ftp://x/"\n', "scheme must be http or https"),
        ('[[routes]]\nprefix = "/a/"\nupstream = "https://u:p@x/"\n', "credentials"),
        ('[[routes]]\nprefix = "/a/"\nupstream = "https://x/"\nextra = 1\n', "extra"),
        ('[[routes]]\nprefix = "a"\nupstream = "https://x/"\n', "route prefix"),
        ('[[routes]]\nprefix = "/a/../b/"\nupstream = "https://x/"\n', "route prefix"),
        ("port = [\n", "config file"),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Config.load(config_file=write(tmp_path, text))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file"):
        Config.load(config_file=tmp_path / "nope.toml")


def test_duplicate_prefixes_are_refused() -> None:
    with pytest.raises(ConfigError, match="configured twice"):
        Config.load(cli={"routes": ["/a/=https://x/", "/a=https://y/"]})


def test_route_normalisation() -> None:
    route = Route.parse("/gh=https://GitHub.com")
    assert route.prefix == "/gh/"
    assert route.upstream == "https://github.com/"
    # One spelling per origin: a default port is dropped, so one mirror is not listed twice.
    assert Route.parse("/a=https://a.test:443/x").upstream == "https://a.test/x/"
    loopback = Route(prefix="/a/", upstream="http://[::1]:80", allow_private=True)
    assert loopback.upstream == "http://[::1]/"
    assert Route.parse("/a=http://a.test:443").upstream == "http://a.test:443/"
    with pytest.raises(ConfigError, match="lists a URL twice"):
        Route(
            prefix="/m/",
            upstreams=(Mirror(url="https://a.test/"), Mirror(url="https://A.test:443/")),
        )


def test_serve_without_routes_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "0"]) == 2
    assert "no routes configured" in capsys.readouterr().err


def test_serve_with_bad_value_exits_nonzero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--route", "/a/=https://x/", "--read-timeout", "soon"]) == 2
    assert "read_timeout (--read-timeout)" in capsys.readouterr().err


def test_transport_aiohttp_is_still_accepted_from_every_source(tmp_path: Path) -> None:
    """Configs written when relay had two transports still load when they name aiohttp."""
    path = write(tmp_path, 'transport = "aiohttp"\nmax_keepalive = 20\n')
    config = Config.load(
        config_file=path, environ={"RELAY_TRANSPORT": "aiohttp"}, cli={"transport": "aiohttp"}
    )
    assert config.transport == "aiohttp"


def test_serve_with_the_removed_httpcore_transport_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--route", "/a/=https://x/", "--transport", "httpcore"])
    assert exited.value.code == 2
    assert "--transport: the httpcore transport was removed" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"transport \(.*relay.toml\): the httpcore transport"):
        Config.load(config_file=write(tmp_path, 'transport = "httpcore"\n'))


def test_describe_is_loggable() -> None:
    config = Config(routes=(Route(prefix="/a/", upstream="https://x/"),))
    described = config.describe()
    assert described["routes"][0]["upstream"] == "https://x/"


def test_one_masking_rule_for_the_startup_log_and_configuration_errors() -> None:
    assert masked("s3cret", secret=True) == "***"
    assert masked(12345678, secret=True) == "***"  # a secret of the wrong type, in an error
    assert masked("", secret=True) == ""  # unset stays visibly unset
    assert (
        masked("a http://user:pw@h.example/x and //tok@h2/")
        == "a http://***@h.example/x and //***@h2/"
    )
    assert masked("/var/cache/relay") == "/var/cache/relay"
    assert masked(60.0) == 60.0


def test_describe_masks_every_secret_and_route_credential() -> None:
    route = Route(prefix="/a/", upstream="https://x/", auth_env="TOKEN")
    config = Config(
        routes=(route.resolve_credential({"TOKEN": "Bearer route-s3cret"}),),
        client_secret="client-s3cret",
        signing_key="signing-s3cret",
        admin_token="admin-s3cret",
    )
    described = config.describe()
    assert "s3cret" not in repr(described)
    assert described["client_secret"] == described["signing_key"] == "***"
    assert described["admin_token"] == described["routes"][0]["credential"] == "***"
    assert described["routes"][0]["auth_env"] == "TOKEN"


def test_ca_file_is_loaded_once_at_startup(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    with pytest.raises(ConfigError, match="ca_file: cannot load"):
        Config.load(cli={"routes": ["/o/=https://up.example/"], "ca_file": str(missing)})
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="ca_file"):
        Config.load(
            environ={"RELAY_ROUTES": "/o/=https://up.example/", "RELAY_CA_FILE": str(garbage)}
        )


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"body_timeout": 0}, "body_timeout"),
        ({"max_streams_per_client": -1}, "max_streams_per_client"),
        ({"min_send_rate": -1}, "min_send_rate"),
        ({"min_rate_window": 0}, "min_rate_window"),
        ({"admin_header": "bad header"}, "admin_header"),
        ({"downloads_max_jobs": 0}, "downloads_max_jobs"),
        ({"downloads_max_bytes": -1}, "downloads_max_bytes"),
        ({"downloads_retention": -1}, "downloads_retention"),
        ({"cache_max_bytes": -5}, "cache_max_bytes"),
        ({"cache_dir": "/var/cache/relay", "cache_max_bytes": 0}, "cache_max_bytes"),
        ({"cache_max_object_bytes": -1}, "cache_max_object_bytes"),
        ({"cache_fill_idle_timeout": -1}, "cache_fill_idle_timeout"),
    ],
)
def test_settings_added_for_hostile_input_and_the_cache_refuse_bad_values(
    settings: dict[str, object], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        Config(**settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("keys", "named"),
    [
        ({"preset": "maven"}, "preset"),
        ({"preset": "hf"}, "redirects"),
        ({"cache_stale_if_error": -1}, "cache_stale_if_error"),
    ],
)
def test_new_route_keys_refuse_bad_values(keys: dict[str, object], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        Route(prefix="/a/", upstream="https://a.example/", **keys)  # type: ignore[arg-type]
