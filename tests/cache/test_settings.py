"""The cache's settings: the same names on CLI, environment and TOML, validated once."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import build_parser
from relay.config import Config
from relay.errors import ConfigError


def test_cache_dir_needs_a_budget() -> None:
    with pytest.raises(ConfigError, match="cache_max_bytes"):
        Config(cache_dir="/tmp/c")
    assert Config(cache_dir="/tmp/c", cache_max_bytes=1).cache_max_bytes == 1


def test_cache_settings_from_env_and_cli() -> None:
    config = Config.load(
        environ={"RELAY_CACHE_DIR": "/var/cache/relay", "RELAY_CACHE_MAX_BYTES": "1000"},
        cli={"cache_fill_idle_timeout": "5"},
    )
    assert (config.cache_dir, config.cache_max_bytes) == ("/var/cache/relay", 1000)
    assert config.cache_fill_idle_timeout == 5
    assert config.cache_slice_bytes == 8 * 1024 * 1024
    args = build_parser().parse_args(
        [
            "serve",
            "--cache-dir",
            "/c",
            "--cache-max-bytes",
            "200000000000",
            "--route",
            "/a/=https://a.example/",
        ]
    )
    assert vars(args)["cache_dir"] == "/c"


def test_cache_route_keys_from_toml(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    toml.write_text(
        'cache_dir = "/c"\ncache_max_bytes = 10\n'
        '[[routes]]\nprefix = "/a/"\nupstream = "https://a.example/"\ncache = false\n'
        '[[routes]]\nprefix = "/b/"\nupstream = "https://b.example/"\ncache_stale_if_error = 60\n'
    )
    config = Config.load(config_file=toml)
    assert [r.cache for r in config.routes] == [False, True]
    assert config.routes[1].cache_stale_if_error == 60.0


def test_cache_slice_bytes_has_a_floor() -> None:
    with pytest.raises(ConfigError, match="cache_slice_bytes"):
        Config(cache_slice_bytes=1)
