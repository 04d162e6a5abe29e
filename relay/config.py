"""Configuration: one typed, validated value built once at startup.

Every setting is a field of `Config`. The same name is used everywhere: `--read-timeout` on the
command line, `RELAY_READ_TIMEOUT` in the environment, `read_timeout` in the TOML file. Sources
are applied in the order defaults < TOML file < environment < command line. Routes are taken
whole from the highest source that defines any (they are not merged across sources).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError

ENV_PREFIX = "RELAY_"

_PREFIX_RE = re.compile(r"^/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]+/)*$")
_UPSTREAM_PATH_RE = re.compile(r"^/(?:[A-Za-z0-9._~!$&'()*+,;=:@%-]+/)*$")


@dataclass(frozen=True, kw_only=True)
class Route:
    """A path prefix served from an upstream base URL.

    Both are normalised to end with "/", so the part of the request path after the prefix is
    always appended below the base: it can never change the upstream host.
    """

    prefix: str
    upstream: str
    allow_private: bool = False

    def __post_init__(self) -> None:
        prefix = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        if not _PREFIX_RE.match(prefix) or any(seg in (".", "..") for seg in prefix.split("/")):
            raise ConfigError(
                f"route prefix {self.prefix!r}: must start with '/' and contain only "
                "unreserved URL characters, without '.' or '..' segments"
            )
        object.__setattr__(self, "prefix", prefix)
        object.__setattr__(self, "upstream", _normalise_upstream(self.upstream))

    @classmethod
    def parse(cls, text: str) -> Route:
        """Parse the command-line form PREFIX=URL."""
        prefix, sep, upstream = text.partition("=")
        if not sep or not prefix or not upstream:
            raise ConfigError(f"route {text!r}: expected PREFIX=URL, e.g. /gh/=https://github.com/")
        return cls(prefix=prefix.strip(), upstream=upstream.strip())


def _normalise_upstream(url: str) -> str:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"route upstream {url!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"route upstream {url!r}: scheme must be http or https")
    if not parts.hostname:
        raise ConfigError(f"route upstream {url!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"route upstream {url!r}: credentials in the URL are not accepted "
            "(they would end up in logs)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"route upstream {url!r}: must not have a query or fragment")
    if port == 0:
        raise ConfigError(f"route upstream {url!r}: port 0 is not valid")
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    if not _UPSTREAM_PATH_RE.match(path) or any(seg in (".", "..") for seg in path.split("/")):
        raise ConfigError(f"route upstream {url!r}: path has characters or segments not allowed")
    return f"{parts.scheme}://{parts.netloc.lower()}{path}"


def _setting(default: Any, help: str, **checks: Any) -> Any:
    return field(default=default, metadata={"help": help, **checks})


@dataclass(frozen=True, kw_only=True)
class Config:
    routes: tuple[Route, ...] = ()
    host: str = _setting("127.0.0.1", "address to listen on")
    port: int = _setting(8000, "port to listen on", min=0, max=65535)
    max_connections: int = _setting(100, "upstream connections open at once (the pool size)", min=1)
    max_keepalive: int = _setting(100, "idle upstream connections kept for reuse", min=0)
    keepalive_expiry: float = _setting(30.0, "seconds an idle upstream connection is kept", min=0)
    connect_timeout: float = _setting(10.0, "seconds to connect to an upstream", positive=True)
    read_timeout: float = _setting(
        30.0, "seconds to wait for upstream headers and between body reads", positive=True
    )
    pool_timeout: float = _setting(
        5.0, "seconds to wait for a free upstream connection before answering 503", min=0
    )
    keepalive_timeout: float = _setting(
        75.0, "seconds an idle client connection is kept open", positive=True
    )
    drain_timeout: float = _setting(
        25.0, "seconds in-flight downloads may finish after shutdown starts", min=0
    )
    shutdown_delay: float = _setting(
        0.0, "seconds to keep accepting requests after SIGTERM (not ready meanwhile)", min=0
    )
    resume_attempts: int = _setting(
        3, "times a failed upstream body is resumed with Range before giving up", min=0
    )
    data_dir: str = _setting(
        "", "directory for downloads to disk and GET /files/ (empty: disk features off)"
    )
    max_downloads: int = _setting(4, "downloads to disk running at once", min=1)
    transport: str = _setting("aiohttp", "upstream HTTP transport", choices=("aiohttp", "httpcore"))
    loop: str = _setting("auto", "event loop", choices=("auto", "uvloop", "asyncio"))
    log_level: str = _setting(
        "info", "log level", choices=("debug", "info", "warning", "error", "critical")
    )

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(Config)
        for f in dataclasses.fields(self):
            if f.name == "routes":
                continue
            _check(f, hints[f.name], getattr(self, f.name), f.name)
        prefixes = [r.prefix for r in self.routes]
        for p in prefixes:
            if prefixes.count(p) > 1:
                raise ConfigError(f"routes: prefix {p!r} is configured twice")
        if self.max_keepalive > self.max_connections:
            object.__setattr__(self, "max_keepalive", self.max_connections)

    @classmethod
    def load(
        cls,
        *,
        cli: Mapping[str, Any] | None = None,
        environ: Mapping[str, str] | None = None,
        config_file: str | Path | None = None,
    ) -> Config:
        """Build a Config from (in rising precedence) a TOML file, RELAY_* variables and CLI."""
        values: dict[str, Any] = {}
        routes: tuple[Route, ...] | None = None
        if config_file is not None:
            file_values, file_routes = _from_toml(Path(config_file))
            values.update(file_values)
            routes = file_routes
        env_values, env_routes = _from_env(environ or {})
        values.update(env_values)
        routes = env_routes if env_routes is not None else routes
        cli = dict(cli or {})
        cli_routes = cli.pop("routes", None)
        values.update(_from_strings(cli, source=lambda k: "--" + k.replace("_", "-")))
        if cli_routes:
            routes = tuple(_parse_route_texts(cli_routes))
        return cls(routes=routes or (), **values)

    def describe(self) -> dict[str, Any]:
        """The effective settings, safe to log."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["routes"] = [dataclasses.asdict(r) for r in self.routes]
        return out


def settings() -> list[dataclasses.Field[Any]]:
    """The scalar settings, in declaration order (routes excluded)."""
    return [f for f in dataclasses.fields(Config) if f.name != "routes"]


def setting_type(name: str) -> type:
    hint = typing.get_type_hints(Config)[name]
    assert isinstance(hint, type)
    return hint


def _check(f: dataclasses.Field[Any], kind: Any, value: Any, where: str) -> None:
    meta = f.metadata
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {value!r}")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: must be one of {', '.join(meta['choices'])}; got {value!r}")
    if meta.get("positive") and not value > 0:
        raise ConfigError(f"{where}: must be greater than 0; got {value!r}")
    if "min" in meta and value < meta["min"]:
        raise ConfigError(f"{where}: must be at least {meta['min']}; got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise ConfigError(f"{where}: must be at most {meta['max']}; got {value!r}")


def _convert(name: str, text: str, where: str) -> Any:
    kind = setting_type(name)
    try:
        if kind is bool:
            lowered = text.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text.strip())
    except ValueError:
        hint = ""
        if where == "RELAY_PORT" and "://" in text:
            hint = (
                " (this looks like a Kubernetes service link for a Service named 'relay'; "
                "set enableServiceLinks: false in the pod spec)"
            )
        raise ConfigError(
            f"{name} ({where}): expected {kind.__name__}, got {text!r}{hint}"
        ) from None


def _from_strings(raw: Mapping[str, Any], *, source: Any) -> dict[str, Any]:
    known = {f.name: f for f in settings()}
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"{source(name)}: unknown setting")
        out[name] = _convert(name, value, source(name)) if isinstance(value, str) else value
        _check(known[name], setting_type(name), out[name], f"{name} ({source(name)})")
    return out


def _from_env(environ: Mapping[str, str]) -> tuple[dict[str, Any], tuple[Route, ...] | None]:
    raw = {
        f.name: environ[ENV_PREFIX + f.name.upper()]
        for f in settings()
        if ENV_PREFIX + f.name.upper() in environ
    }
    values = _from_strings(raw, source=lambda k: ENV_PREFIX + k.upper())
    routes_text = environ.get(ENV_PREFIX + "ROUTES")
    routes = None
    if routes_text is not None and routes_text.strip():
        routes = tuple(_parse_route_texts(re.split(r"[\s,]+", routes_text.strip())))
    return values, routes


def _parse_route_texts(texts: Sequence[str]) -> list[Route]:
    return [Route.parse(t) for t in texts if t]


_ROUTE_KEYS = {f.name for f in dataclasses.fields(Route)}


def _from_toml(path: Path) -> tuple[dict[str, Any], tuple[Route, ...] | None]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r}: {exc}") from None
    known = {f.name: f for f in settings()}
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "routes":
            continue
        if key not in known:
            raise ConfigError(f"{key} ({path}): unknown setting")
        _check(known[key], setting_type(key), value, f"{key} ({path})")
        values[key] = float(value) if setting_type(key) is float else value
    routes = None
    if "routes" in data:
        if not isinstance(data["routes"], list):
            raise ConfigError(f"routes ({path}): expected [[routes]] tables")
        parsed = []
        for i, table in enumerate(data["routes"]):
            where = f"routes[{i}] ({path})"
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: expected a table")
            unknown = set(table) - _ROUTE_KEYS
            if unknown:
                raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
            for required in ("prefix", "upstream"):
                if not isinstance(table.get(required), str):
                    raise ConfigError(f"{where}.{required}: required, a string")
            if not isinstance(table.get("allow_private", False), bool):
                raise ConfigError(f"{where}.allow_private: expected true or false")
            parsed.append(Route(**table))
        routes = tuple(parsed)
    return values, routes
