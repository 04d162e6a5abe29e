"""Configuration: one typed, validated value built once at startup.

Every setting is a field of `Config`. The same name is used everywhere: `--read-timeout` on the
command line, `RELAY_READ_TIMEOUT` in the environment, `read_timeout` in the TOML file. Sources
are applied in the order defaults < TOML file < environment < command line. Routes are taken
whole from the highest source that defines any (they are not merged across sources).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import socket
import ssl
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relay.errors import ConfigError
from relay.net.addresses import parse_ip, refusal

ENV_PREFIX = "RELAY_"

_PREFIX_RE = re.compile(r"^/(?:[A-Za-z0-9._~!$&'()*+,;=:@-]+/)*$")
_UPSTREAM_PATH_RE = re.compile(r"^/(?:[A-Za-z0-9._~!$&'()*+,;=:@%-]+/)*$")
_HOST_PATTERN_RE = re.compile(
    r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"
)
_TOKEN_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


def _literal_refusal(host: str) -> str | None:
    """Why an IP-literal upstream host is refused (odd IPv4 spellings included), or None."""
    ip = parse_ip(host)
    if ip is None and re.fullmatch(r"[0-9a-fA-FxX.]+", host):
        try:  # 127.1, 2130706433, 0x7f.1: forms inet_aton (and so getaddrinfo) accepts
            ip = ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return refusal(ip) if ip is not None else None


def _read_secret_file(path: str, where: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where} {path!r}: {exc.strerror}") from None


def _key(default: Any, help: str, details: str = "", **checks: Any) -> Any:
    """A `[[routes]]` key's field: its text, as for settings (see `_setting`)."""
    return field(default=default, metadata={"help": help, "details": details, **checks})


_REDIRECTS = ("pass", "follow")
_FAILOVER = ("not-found", "any")


@dataclass(frozen=True, kw_only=True)
class Mirror:
    """One of a route's upstream base URLs, with the credential sent to it alone."""

    url: str
    auth_env: str = ""
    auth_file: str = ""
    username_env: str = ""
    """oci: the registry user name for this mirror alone (with `password_env`)."""
    password_env: str = ""
    credential: str = field(default="", repr=False, compare=False)
    """The resolved credential; never logged."""
    registry_credential: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    """oci: the resolved (user name, password) of username_env/password_env; never logged."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "url", _normalise_upstream(self.url))
        if self.auth_env and self.auth_file:
            raise ConfigError(f"mirror {self.url}: give auth_env or auth_file, not both")
        if bool(self.username_env) != bool(self.password_env):
            raise ConfigError(
                f"mirror {self.url}: give both username_env and password_env, or neither"
            )

    def describe(self) -> dict[str, str]:
        out = {"url": self.url, "auth_env": self.auth_env, "auth_file": self.auth_file}
        if self.username_env:
            out |= {"username_env": self.username_env, "password_env": self.password_env}
        return out

    @property
    def host(self) -> str:
        return urlsplit(self.url).netloc


_PRESETS = ("", "pypi", "npm", "hf", "oci", "debian")
_REGISTRY_HOST_RE = re.compile(
    r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*(:[0-9]{1,5})?$"
)


@dataclass(frozen=True, kw_only=True)
class Route:
    """A path prefix served from an upstream base URL.

    Both are normalised to end with "/", so the part of the request path after the prefix is
    always appended below the base: it can never change the upstream host.
    """

    prefix: str = field(
        metadata={"help": "the path prefix served, starting with '/' (normalised to end with '/')"}
    )
    upstream: str = _key(
        "",
        "the http(s) base URL the prefix is served from (normalised to end with '/')",
        "The part of the request path after the prefix is appended below it as the client "
        "sent it, with the query: it can never change the upstream host. No user "
        "information, query or fragment. Give `upstream` or `upstreams`.",
    )
    upstreams: tuple[Mirror, ...] = _key(
        (),
        "several base URLs serving the same files (mirrors), tried in order",
        'Instead of `upstream`. Each item is a URL or a table `{ url = "...", auth_env = '
        '"..." }` (or `auth_file`) whose credential goes to that mirror alone; the route\'s '
        "own `auth_env`/`auth_file` are then not accepted (an oci route's mirrors are "
        "registries: `{ url, username_env, password_env }`, each with its own token realm). "
        "When the next mirror is asked: "
        "`failover`; mirrors that keep failing rest: `max_fails`, `fail_timeout` "
        "([mirrors](mirrors.md#several-mirrors-per-route)). On the command line and in the "
        'environment: `PREFIX=URL1,URL2` (`failover = "not-found"`) or `PREFIX=URL1|URL2` '
        '(`failover = "any"`), as in Go\'s GOPROXY.',
        kind="list of URLs or `{ url, auth_env, auth_file }` tables (oci: `{ url, "
        "username_env, password_env }`)",
    )
    failover: str = _key(
        "not-found",
        '"not-found": the next mirror only on 404/410; "any": also on a connect error, '
        "timeout, 5xx or 429",
        "Never on 401, 403, 407 or any other 4xx, and never once a byte of the body went to "
        'the client. With "not-found", a name one mirror does not know reaches the next only '
        "when the first answered that it does not have it (never during its outage).",
        choices=_FAILOVER,
    )
    max_fails: int = _key(
        1,
        "failures within fail_timeout after which a mirror rests (0: never)",
        "A failure: a connect error, a timeout, a 5xx or 429 answer. Only routes with several "
        "mirrors; a single upstream is always asked.",
        min=0,
    )
    fail_timeout: float = _key(
        10.0,
        "seconds in which max_fails failures make a mirror rest, and how long it rests",
        "Then it is asked again; one more failure and it rests again (as nginx's `max_fails`, "
        '`fail_timeout`). A resting mirror is skipped with `failover = "any"`; when every '
        "mirror rests, the route answers 503 at once, naming the cause.",
        positive=True,
    )
    hedge_after: float = _key(
        0.0,
        "seconds to wait for a mirror's response head before also asking the next (0: off)",
        'The first good head wins; the other request is closed. Needs `failover = "any"`.',
        min=0,
    )
    allow_private: bool = _key(
        False,
        "reach loopback, private, link-local and other non-public addresses",
        "For in-cluster upstreams (and tests); refused at startup or connect time otherwise "
        "([egress guard](security.md#egress-guard-ssrf)).",
    )
    redirects: str = _key(
        "pass",
        '"pass": upstream redirects go to the client; "follow": relay follows them itself',
        "Passed: a `Location` below any route's upstream is rewritten to relay's path. "
        'Followed: only to `redirect_hosts`, at most `max_redirects` hops; "follow" needs '
        "`redirect_hosts`.",
        choices=_REDIRECTS,
    )
    redirect_hosts: tuple[str, ...] = _key(
        (),
        'hosts a followed redirect may go to: exact names or "*.example.com" suffixes',
        'E.g. `["objects.githubusercontent.com", "*.s3.amazonaws.com"]`.',
    )
    max_redirects: int = _key(5, "followed hops before answering 502 (1-20)")
    auth_header: str = _key("Authorization", "header carrying the route's upstream credential")
    auth_env: str = _key(
        "",
        "environment variable holding the credential (the whole header value)",
        "E.g. `Bearer ghp_...`; read once at startup, never logged, masked in the startup log. "
        "Give `auth_env` or `auth_file`, not both.",
    )
    auth_file: str = _key("", "file holding the credential (the whole header value)")
    forward_client_auth: bool = _key(
        False,
        "forward the client's own Authorization and Cookie upstream",
        "With it, a request carrying either bypasses the cache. Never to another origin on a "
        "followed redirect.",
    )
    preset: str = _key(
        "",
        'a package-ecosystem preset: "pypi", "npm", "hf", "oci" or "debian" ("": none)',
        '"pypi" and "npm" rewrite index pages and packuments so their file links point at '
        'relay\'s routes; "hf" (needs `redirects = "follow"`) keeps the Hub\'s file '
        'metadata headers through redirects and withholds Xet\'s; "oci" makes the route a '
        "read-only pull-through container registry mirror, answered under `/v2/`; "
        '"debian" caches `pool/` and `by-hash/` files as immutable and revalidates the rest '
        "of `dists/` on every request ([package mirrors](mirrors.md)). Without a preset, "
        "bytes are never changed.",
        choices=_PRESETS,
    )
    registry_hosts: tuple[str, ...] = _key(
        (),
        'oci: the registry host names this route mirrors (containerd\'s "ns=")',
        'E.g. `["docker.io"]` for `https://registry-1.docker.io`. Empty: the upstream\'s '
        "host (and port). A request's `ns` must name one of a configured route's hosts; it "
        "never selects a host by itself.",
    )
    registry_default: bool = _key(
        False,
        "oci: answer `/v2/<name>` requests that carry no ns= and no route name prefix",
        "For docker's `registry-mirrors` (Docker Hub only). At most one route.",
    )
    tag_max_age: float = _key(
        300.0,
        "oci: seconds a tag's manifest is fresh; then it is checked with a HEAD",
        "An unchanged `Docker-Content-Digest` refreshes it without a GET (no rate-limit "
        "cost); a stored tag is answered stale when the upstream errs or answers 429.",
    )
    username_env: str = _key(
        "",
        "oci: environment variable holding the registry user name",
        "With `password_env`: sent (Basic) to the registry's token realm, or to the registry "
        "when it asks for Basic. Without them relay pulls anonymously. With several "
        "`upstreams`, each registry's are given in its own table.",
    )
    password_env: str = _key(
        "", "oci: environment variable holding the registry password or access token"
    )
    immutable: bool = _key(
        False,
        "every 200 of this route is an immutable file (a files host, a CDN)",
        "With the cache on, its files stay fresh for at least a year whatever lifetime the "
        "upstream gives (unless it says `no-cache`); nothing changes in relaying.",
    )
    cache: bool = _key(
        True, "serve the route through the read-through cache (when cache_dir is set)"
    )
    cache_stale_if_error: float = _key(
        0.0,
        "seconds past freshness a cached object may be served when the upstream fails",
        "Only when the upstream said nothing itself (no `stale-if-error`); `0`: only as the "
        "upstream allows.",
    )
    credential: str = field(default="", repr=False, compare=False)
    """The resolved credential; never logged."""
    registry_credential: tuple[str, str] | None = field(default=None, repr=False, compare=False)
    """oci: the resolved (user name, password) of username_env/password_env; never logged."""

    def __post_init__(self) -> None:
        prefix = self.prefix if self.prefix.endswith("/") else self.prefix + "/"
        if not _PREFIX_RE.match(prefix) or any(seg in (".", "..") for seg in prefix.split("/")):
            raise ConfigError(
                f"route prefix {mask_url(self.prefix)!r}: must start with '/' and contain only "
                "unreserved URL characters, without '.' or '..' segments"
            )
        object.__setattr__(self, "prefix", prefix)
        where = f"route {prefix}"
        self._set_mirrors(where)
        if self.redirects not in _REDIRECTS:
            raise ConfigError(f"{where}: redirects must be 'pass' or 'follow'")
        if self.preset not in _PRESETS:
            raise ConfigError(f"{where}: preset must be one of {', '.join(_PRESETS[1:])}")
        if self.preset == "oci":
            self._check_oci(where)
        elif self.username_env or any(m.username_env for m in self.upstreams):
            raise ConfigError(f"{where}: username_env/password_env are for preset = 'oci'")
        if self.preset == "hf" and self.redirects != "follow":
            # huggingface_hub follows same-host redirects while reading a file's metadata: a
            # passed redirect to relay's CDN route would lose X-Repo-Commit and X-Linked-*.
            raise ConfigError(f"{where}: preset = 'hf' needs redirects = 'follow'")
        if self.redirects == "follow" and not self.redirect_hosts and self.preset != "oci":
            raise ConfigError(f"{where}: redirects = 'follow' needs redirect_hosts")
        for host in self.redirect_hosts:
            if not _HOST_PATTERN_RE.match(host):
                raise ConfigError(f"{where}: redirect_hosts entry {host!r} is not a host name")
        if not 0 < self.max_redirects <= 20:
            raise ConfigError(f"{where}: max_redirects must be between 1 and 20")
        if not _TOKEN_RE.match(self.auth_header):
            raise ConfigError(f"{where}: auth_header {self.auth_header!r} is not a header name")
        if self.auth_env and self.auth_file:
            raise ConfigError(f"{where}: give auth_env or auth_file, not both")
        object.__setattr__(self, "redirect_hosts", tuple(h.lower() for h in self.redirect_hosts))
        if self.cache_stale_if_error < 0:
            raise ConfigError(f"{where}: cache_stale_if_error must be >= 0")
        if self.failover not in _FAILOVER:
            raise ConfigError(f"{where}: failover must be 'not-found' or 'any'")
        if self.max_fails < 0 or not self.fail_timeout > 0 or self.hedge_after < 0:
            raise ConfigError(
                f"{where}: max_fails must be >= 0, fail_timeout > 0 and hedge_after >= 0"
            )
        if self.hedge_after and (self.failover != "any" or len(self.upstreams) < 2):
            raise ConfigError(
                f"{where}: hedge_after needs several upstreams and failover = 'any' "
                "(a hedged request goes to the next mirror whatever the first answers)"
            )
        if not self.allow_private:
            for mirror in self.upstreams:
                reason = _literal_refusal(urlsplit(mirror.url).hostname or "")
                if reason:
                    raise ConfigError(
                        f"{where}: upstream {mirror.url} is a {reason}; "
                        "set allow_private = true to reach it deliberately"
                    )

    def _set_mirrors(self, where: str) -> None:
        """`upstream` and `upstreams` made one: `upstreams` holds every mirror, the first
        being `upstream`, whose credential is the route's own (`auth_env`/`auth_file`)."""
        items = tuple(m if isinstance(m, Mirror) else Mirror(url=m) for m in self.upstreams)
        if self.upstream and len(items) <= 1:
            first = Mirror(url=self.upstream, auth_env=self.auth_env, auth_file=self.auth_file)
            object.__setattr__(self, "upstreams", (first,))
            object.__setattr__(self, "upstream", first.url)
            return
        if not items:
            raise ConfigError(f"{where}: give upstream or upstreams")
        if self.upstream and _normalise_upstream(self.upstream) != items[0].url:
            raise ConfigError(f"{where}: give upstream or upstreams, not both")
        urls = [m.url for m in items]
        if len(set(urls)) != len(urls):
            raise ConfigError(f"{where}: upstreams lists a URL twice")
        first = items[0]
        several = len(items) > 1
        oci = self.preset == "oci"  # an oci route's auth_env is refused in _check_oci
        self._lift(
            where, first, ("auth_env", "auth_file"), several and not oci, "credential", "auth_env"
        )
        self._lift(
            where, first, ("username_env", "password_env"), several, "user name", "username_env"
        )
        object.__setattr__(self, "upstreams", items)
        object.__setattr__(self, "upstream", first.url)

    def _lift(
        self, where: str, first: Mirror, names: tuple[str, str], several: bool, what: str, key: str
    ) -> None:
        """The first mirror's pair of settings `names` (a credential's, a registry account's)
        becomes the route's own; with several mirrors, the route's own pair alone is refused:
        each mirror names its own (a credential goes to its own mirror only)."""
        mine = tuple(getattr(self, n) for n in names)
        theirs = tuple(getattr(first, n) for n in names)
        if any(theirs):
            if any(mine) and mine != theirs:
                raise ConfigError(f"{where}: the first mirror's {what} is given twice")
            for name, value in zip(names, theirs, strict=True):
                object.__setattr__(self, name, value)
        elif several and any(mine):
            raise ConfigError(
                f"{where}: with several upstreams, give each mirror its own {what}: "
                f'upstreams = [{{ url = "...", {key} = "..." }}, ...] (a credential is sent '
                "to its own mirror only)"
            )

    def _check_oci(self, where: str) -> None:
        """An oci route: always follows redirects (to redirect_hosts only: blobs live in
        object storage), never forwards a client's or a fixed credential (relay does the
        registry's token dance itself), mirrors named registry hosts."""
        if self.auth_env or self.auth_file or self.forward_client_auth:
            raise ConfigError(
                f"{where}: preset = 'oci' takes username_env/password_env, not auth_env, "
                "auth_file or forward_client_auth (relay fetches the registry's tokens itself)"
            )
        if bool(self.username_env) != bool(self.password_env):
            raise ConfigError(f"{where}: give both username_env and password_env, or neither")
        if self.tag_max_age < 0:
            raise ConfigError(f"{where}: tag_max_age must be >= 0")
        if self.prefix == "/v2/" or self.prefix.startswith("/v2/"):
            raise ConfigError(f"{where}: an oci route's prefix cannot be under /v2/")
        object.__setattr__(self, "redirects", "follow")
        for mirror in self.upstreams:
            if mirror.auth_env or mirror.auth_file:
                raise ConfigError(
                    f"{where}: an oci mirror takes username_env/password_env, not auth_env "
                    "or auth_file (relay fetches each registry's tokens itself)"
                )
            if urlsplit(mirror.url).path != "/":
                raise ConfigError(f"{where}: an oci upstream is a registry's base URL (no path)")
        parts = urlsplit(self.upstream)
        hosts = tuple(h.lower() for h in self.registry_hosts) or (parts.netloc,)
        for host in hosts:
            if not _REGISTRY_HOST_RE.match(host):
                raise ConfigError(f"{where}: registry_hosts entry {host!r} is not a host name")
        object.__setattr__(self, "registry_hosts", hosts)

    def resolve_credential(self, environ: Mapping[str, str]) -> Route:
        """Read the credentials named by auth_env/auth_file (the route's, its first
        mirror's, and each other mirror's own), or an oci route's user name and password
        (username_env/password_env), at startup, never at import."""
        where = f"route {self.prefix}"
        if self.preset == "oci":
            logins = [
                _login(m.username_env, m.password_env, environ, f"{where} mirror {i}")
                for i, m in enumerate(self.upstreams, 1)
            ]
            logins[0] = _login(self.username_env, self.password_env, environ, where)
            upstreams = tuple(
                dataclasses.replace(m, registry_credential=login)
                for m, login in zip(self.upstreams, logins, strict=True)
            )
            return dataclasses.replace(self, registry_credential=logins[0], upstreams=upstreams)
        mirrors = [self.upstreams[0]]
        for i, mirror in enumerate(self.upstreams[1:], 2):
            value = _credential(mirror.auth_env, mirror.auth_file, environ, f"{where} mirror {i}")
            mirrors.append(dataclasses.replace(mirror, credential=value or ""))
        route = self
        if len(mirrors) > 1:
            route = dataclasses.replace(route, upstreams=tuple(mirrors))
        value = _credential(self.auth_env, self.auth_file, environ, where)
        return route if value is None else dataclasses.replace(route, credential=value)

    def mirror_login(self, index: int) -> tuple[str, str] | None:
        """oci: the (user name, password) relay uses at mirror `index`'s registry."""
        return self.registry_credential if index == 0 else self.upstreams[index].registry_credential

    def mirror_credential(self, index: int) -> str:
        """The credential sent to mirror `index` ("": none)."""
        return self.credential if index == 0 else self.upstreams[index].credential

    def describe(self) -> dict[str, Any]:
        """The route's keys, safe to log: the credentials are masked."""
        out = {
            f.name: masked(
                getattr(self, f.name), secret=f.name in ("credential", "registry_credential")
            )
            for f in dataclasses.fields(self)
        }
        out["upstreams"] = [m.describe() for m in self.upstreams]
        return out

    @classmethod
    def parse(cls, text: str) -> Route:
        """Parse the command-line form PREFIX=URL, PREFIX=URL1,URL2 (mirrors, the next asked
        on not-found) or PREFIX=URL1|URL2 (the next asked on any failure)."""
        prefix, sep, upstream = text.partition("=")
        if not sep or not prefix or not upstream:
            raise ConfigError(
                f"route {mask_url(text)!r}: expected PREFIX=URL, e.g. /gh/=https://github.com/"
            )
        if "," in upstream and "|" in upstream:
            raise ConfigError(
                f"route {mask_url(text)!r}: separate mirrors with ',' (next on not-found) or "
                "'|' (next on any failure), not both"
            )
        separator = "|" if "|" in upstream else ","
        urls = [u.strip() for u in upstream.split(separator)]
        if len(urls) == 1:
            return cls(prefix=prefix.strip(), upstream=urls[0])
        failover = "any" if separator == "|" else "not-found"
        mirrors = tuple(Mirror(url=url) for url in urls)
        return cls(prefix=prefix.strip(), upstreams=mirrors, failover=failover)


def _credential(
    auth_env: str, auth_file: str, environ: Mapping[str, str], where: str
) -> str | None:
    if auth_env:
        if not environ.get(auth_env):
            raise ConfigError(f"{where}: auth_env {auth_env} is not set")
        value = environ[auth_env]
    elif auth_file:
        value = _read_secret_file(auth_file, f"{where}: auth_file")
    else:
        return None
    if any(c in value for c in "\r\n\x00"):
        raise ConfigError(f"{where}: the credential must be a single header value")
    if not value.isascii():
        # httpx sends header text as ASCII: every request would fail (500) otherwise.
        raise ConfigError(f"{where}: the credential must be ASCII")
    return value.strip()


def mask_url(text: str) -> str:
    """`text` with the user information of any URL in it replaced by "***" (for messages)."""
    return _USERINFO_RE.sub(r"\1***@", text)


def masked(value: Any, *, secret: bool = False) -> Any:
    """A setting's value as relay shows it (the startup log, configuration errors): a secret's
    value is "***" once set, and so is the user information of any URL in a text."""
    if secret and value not in ("", None):
        return "***"
    return mask_url(value) if isinstance(value, str) else value


_USERINFO_RE = re.compile(r"(//)[^/?#@\s]*@")


def _normalise_upstream(url: str) -> str:
    shown = mask_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"route upstream {shown!r}: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ConfigError(f"route upstream {shown!r}: scheme must be http or https")
    if not parts.hostname:
        raise ConfigError(f"route upstream {shown!r}: no host")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(
            f"route upstream {shown!r}: credentials in the URL are not accepted "
            "(they would end up in logs)"
        )
    if parts.query or parts.fragment:
        raise ConfigError(f"route upstream {shown!r}: must not have a query or fragment")
    if port == 0:
        raise ConfigError(f"route upstream {shown!r}: port 0 is not valid")
    path = parts.path or "/"
    if not path.endswith("/"):
        path += "/"
    if not _UPSTREAM_PATH_RE.match(path) or any(seg in (".", "..") for seg in path.split("/")):
        raise ConfigError(f"route upstream {shown!r}: path has characters or segments not allowed")
    netloc = parts.netloc.lower()
    if port == {"http": 80, "https": 443}[parts.scheme]:
        netloc = netloc.rpartition(":")[0]  # one spelling per origin: a.test, not a.test:443
    return f"{parts.scheme}://{netloc}{path}"


GROUPS = (
    "server",
    "routes",
    "limits",
    "timeouts",
    "upstream",
    "cache",
    "downloads",
    "security",
    "logging",
)
"""The groups settings are documented in (docs/configuration.md), in this order."""


def _setting(
    default: Any,
    help: str,
    *,
    group: str,
    details: str = "",
    secret: bool = False,
    **checks: Any,
) -> Any:
    """A setting's field. `help` is its one line (`relay serve --help` and the reference);
    `details` says more in the reference only (docs/configuration.md, scripts/gen-docs)."""
    if group not in GROUPS:
        raise ValueError(f"setting group {group!r} is not one of {GROUPS}")
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "group": group, "details": details, "secret": secret, **checks},
    )


@dataclass(frozen=True, kw_only=True)
class Config:
    routes: tuple[Route, ...] = field(
        default=(),
        metadata={
            "help": "serve PREFIX from the upstream base URL, e.g. /gh/=https://github.com/ "
            "(mirrors: PREFIX=URL1,URL2 next on not-found, PREFIX=URL1|URL2 next on any failure)",
            "group": "routes",
            "flag": "--route",
            "metavar": "PREFIX=URL",
        },
    )
    host: str = _setting(
        "127.0.0.1", "address to listen on", group="server", details="`0.0.0.0` in containers."
    )
    port: int = _setting(8000, "port to listen on", group="server", min=0, max=65535)
    workers: int = _setting(
        1,
        "server processes sharing the port, the limits, /metrics and the stores",
        group="server",
        details="`1`: one process, no supervisor. More: a supervisor binds the port, runs this "
        "many worker processes and restarts one that dies; `max_streams` and "
        "`max_streams_per_client` hold across all of them, `max_connections` is split evenly "
        "between them, one `/metrics` scrape sums them all, and downloads to disk run once "
        "whichever worker was asked ([operations](operations.md#workers)). On Kubernetes, "
        "keep 1 and add replicas.",
        min=1,
        max=256,
    )
    max_connections: int = _setting(
        100, "upstream connections open at once (the pool size)", group="upstream", min=1
    )
    max_keepalive: int = _setting(
        100,
        "no effect: accepted so existing configs load",
        group="upstream",
        details="It bounded the idle pool of the httpcore transport, which was removed. The "
        "aiohttp transport keeps an idle connection for `keepalive_expiry`, and opens at most "
        "`max_connections` at once.",
        min=0,
    )
    keepalive_expiry: float = _setting(
        30.0, "seconds an idle upstream connection is kept", group="upstream", min=0
    )
    connect_timeout: float = _setting(
        10.0,
        "seconds to connect to an upstream",
        group="timeouts",
        details="DNS, TCP and TLS together; past it, 504.",
        positive=True,
    )
    read_timeout: float = _setting(
        30.0,
        "seconds to wait for upstream headers and between body reads",
        group="timeouts",
        details="The complete response head must arrive within it (else 504, even while a "
        "head trickles in); then each body read (else the client transfer is aborted, or "
        "resumed). It counts only time a request waits, never a pooled connection's idle "
        "time. There is no total timeout: a long healthy download is never cut.",
        positive=True,
    )
    pool_timeout: float = _setting(
        5.0,
        "seconds to wait for a free upstream connection before answering 503",
        group="timeouts",
        details="The 503 carries `Retry-After: 1`.",
        min=0,
    )
    keepalive_timeout: float = _setting(
        75.0,
        "seconds an idle client connection is kept open",
        group="timeouts",
        details="Longer than CDNs' origin keep-alive, so relay never closes a connection a "
        "CDN is about to reuse.",
        positive=True,
    )
    drain_timeout: float = _setting(
        25.0,
        "seconds in-flight downloads may finish after shutdown starts",
        group="server",
        details="Downloads still running then are aborted (never ended cleanly short). On "
        "Kubernetes, `terminationGracePeriodSeconds` must exceed preStop + `shutdown_delay` + "
        "`drain_timeout`.",
        min=0,
    )
    shutdown_delay: float = _setting(
        0.0,
        "seconds to keep accepting requests after SIGTERM (not ready meanwhile)",
        group="server",
        details="`/readyz` answers 503 from the SIGTERM on, so load balancers stop sending "
        "before the listener closes.",
        min=0,
    )
    resume_attempts: int = _setting(
        3,
        "times a failed upstream body is resumed with Range before giving up",
        group="upstream",
        details="Resumed with `Range` + `If-Range` before the client transfer is aborted; `0` "
        "turns transparent resume off. For downloads to disk: failures in a row without 1 MiB "
        "of progress before the job fails.",
        min=0,
    )
    data_dir: str = _setting(
        "",
        "directory for downloads to disk and GET /files/ (empty: disk features off)",
        group="downloads",
        details="Without it, `/downloads` and `/files/` are not mounted and belong to the routes "
        "like any other path. One relay per `data_dir`: a second one refuses to start (exit "
        "code 1).",
    )
    max_downloads: int = _setting(
        4,
        "downloads to disk running at once",
        group="downloads",
        details="The rest queue.",
        min=1,
    )
    downloads_open: bool = _setting(
        False,
        "let every client use the /downloads API without admin_token (explicit opt-out)",
        group="downloads",
        details="relay refuses to start with `data_dir` and neither `admin_token` nor this.",
    )
    downloads_max_jobs: int = _setting(
        1000,
        "download jobs kept (any state); past it POST /downloads answers 507",
        group="downloads",
        min=1,
    )
    downloads_max_bytes: int = _setting(
        10 * 1024**3,
        "bytes of downloaded and partial files in data_dir; past it 507 (0: no limit)",
        group="downloads",
        details="Published files plus each queued or running job's partial file or announced "
        "length. A running job whose announced length does not fit fails.",
        min=0,
    )
    downloads_retention: float = _setting(
        7 * 24 * 3600.0,
        "seconds a finished download job (and a completed job's file) is kept (0: forever)",
        group="downloads",
        details="Finished: completed, failed or cancelled.",
        min=0,
    )
    max_streams: int = _setting(
        1000,
        "relayed streams at once; past it, 503 with Retry-After at once",
        group="limits",
        details="`Retry-After: 1`; streams in flight are unaffected.",
        min=1,
    )
    send_timeout: float = _setting(
        60.0,
        "seconds a client may stop reading before its download is cut",
        group="timeouts",
        details="The connection is reset and its upstream connection released.",
        positive=True,
    )
    header_timeout: float = _setting(
        15.0,
        "seconds a client may take to send its request headers",
        group="timeouts",
        details="From the first byte of a request (or from the connection, for the first one) "
        "to the end of its headers: a slowloris client gets 408 and is closed.",
        positive=True,
    )
    max_header_bytes: int = _setting(
        16384,
        "largest request head (request line and headers) accepted; else 431",
        group="limits",
        details="A head may also have at most 100 header fields. The connection is closed.",
        min=1024,
    )
    body_timeout: float = _setting(
        15.0,
        "seconds a client may take to send a request body after its headers; else 408",
        group="timeouts",
        details="Counted from the end of the headers. The connection is closed.",
        positive=True,
    )
    max_body_bytes: int = _setting(
        65536,
        "largest request body accepted (POST /downloads); else 413",
        group="limits",
        details="The connection is closed. The downloads API allows 16 KiB of JSON itself.",
        min=0,
    )
    max_streams_per_client: int = _setting(
        0,
        "relayed streams at once per client address; past it, 429 (0: no limit)",
        group="limits",
        details="The address is the one `trusted_proxies` resolves, so behind a trusted proxy "
        "each `X-Forwarded-For` client counts alone. The 429 carries `Retry-After: 1`. Off by "
        "default: without `trusted_proxies`, a CDN or ingress is one address.",
        min=0,
    )
    min_send_rate: int = _setting(
        0,
        "bytes/s a client must read, per min_rate_window, or be cut (0: off)",
        group="limits",
        details="Past a first `min_rate_window` of grace, a client that relay spent at least "
        "half a window waiting on, and that took less than this rate over that time, is cut "
        "(connection reset), whether relayed or answered from the cache (zero-copy hits "
        "included). It judges the client only: a slow upstream or cache fill does not get its "
        "clients cut. Off by default: a right value depends on your clients and objects (see "
        "[operations](operations.md#slow-readers)).",
        min=0,
    )
    min_rate_window: float = _setting(
        30.0,
        "seconds of grace, then of each window the min_send_rate is judged over",
        group="limits",
        positive=True,
    )
    trusted_proxies: str = _setting(
        "",
        "comma-separated addresses/CIDRs whose X-Forwarded-* headers are trusted",
        group="security",
        details="relay believes `X-Forwarded-For`, `-Proto` and `-Host` only from these peers; "
        "from any other it sends `X-Forwarded-For: <peer>` and discards the client's claims.",
    )
    client_secret: str = _setting(
        "",
        "shared secret clients must send in client_secret_header",
        group="security",
        details="How CDNs authenticate to an origin. Missing: 401; wrong: 403. "
        "`/healthz`, `/readyz` and `/metrics` stay open.",
        secret=True,
    )
    client_secret_file: str = _setting("", "file holding client_secret", group="security")
    client_secret_header: str = _setting(
        "X-Relay-Secret",
        "header carrying the shared secret (as CDNs send to origins)",
        group="security",
    )
    signing_key: str = _setting(
        "",
        "key for HMAC-signed expiring URLs (?expires=&signature=)",
        group="security",
        details="`relay sign` makes such URLs; a signature covers the method, the path and the "
        "query ([security](security.md#client-authentication)).",
        secret=True,
    )
    signing_key_file: str = _setting("", "file holding signing_key", group="security")
    admin_token: str = _setting(
        "",
        "credential for relay's admin endpoints (the /downloads API)",
        group="security",
        details="Required by the `/downloads` API and the cache's purge, prefetch and scrub; "
        "compared in constant time, never logged. Needed with `data_dir` unless "
        "`downloads_open`.",
        secret=True,
    )
    admin_token_file: str = _setting("", "file holding admin_token", group="security")
    admin_header: str = _setting(
        "X-Relay-Admin-Token", "header carrying admin_token", group="security"
    )
    ca_file: str = _setting(
        "",
        "PEM file of CA certificates trusted for https upstreams (empty: the defaults)",
        group="upstream",
        details="For an internal CA, say; without it, the system's certificates are trusted. "
        "Loaded once at startup.",
    )
    transport: str = _setting(
        "aiohttp",
        "upstream HTTP transport: aiohttp, the only one",
        group="upstream",
        details="Accepted so configs that name `aiohttp` still load. The httpcore transport was "
        "removed (3.5x slower per byte): `httpcore` is refused at startup with a message "
        "saying so.",
        choices=("aiohttp",),
        removed={
            "httpcore": "the httpcore transport was removed; aiohttp is relay's only upstream"
            " transport (remove the setting)"
        },
    )
    loop: str = _setting(
        "auto",
        "event loop",
        group="server",
        details="`auto`: uvloop (what relay's figures were measured on).",
        choices=("auto", "uvloop", "asyncio"),
    )
    log_level: str = _setting(
        "info",
        "log level",
        group="logging",
        details="It applies to diagnostic logs; access records follow `access_log` alone.",
        choices=("debug", "info", "warning", "error", "critical"),
    )
    log_format: str = _setting(
        "auto",
        "log format (auto: text on a terminal, else json)",
        group="logging",
        details="`json`: one JSON object per line; `text`: one human-readable line per record; "
        "`auto`: `text` when stderr is a terminal, `json` otherwise.",
        choices=("auto", "json", "text"),
    )
    access_log: bool = _setting(
        True,
        "log one record per request",
        group="logging",
        details="Logger `relay.access` ([operations](operations.md#logs)).",
    )
    cache_dir: str = _setting(
        "", "directory of the read-through cache (empty: cache off)", group="cache"
    )
    cache_max_bytes: int = _setting(
        0,
        "disk budget of the cache; least recently used objects are evicted past it",
        group="cache",
        details="Required (> 0) with `cache_dir`. Counts what the cache takes on disk: data "
        "and metadata files rounded up to the filesystem's block, its directories, and what "
        "fills in flight reserved.",
        min=0,
    )
    cache_max_object_bytes: int = _setting(
        0,
        "largest object the cache stores; larger ones are relayed (0: cache_max_bytes / 4)",
        group="cache",
        min=0,
    )
    cache_slice_bytes: int = _setting(
        8 * 1024 * 1024,
        "size of the aligned slices ranges are fetched and stored in",
        group="cache",
        details="A Range request for an object not stored whole is answered from aligned "
        "slices of this size, each fetched (`Range` + `If-Range`) and stored on its own.",
        min=65536,
    )
    cache_fill_idle_timeout: float = _setting(
        300.0,
        "seconds a cache fill runs on after its last client left",
        group="cache",
        details="Then it stops and stores nothing.",
        min=0,
    )
    cache_verify_on_start: bool = _setting(
        True,
        "verify the loaded objects with a known digest in the background at startup",
        group="cache",
        details="Objects whose SHA-256 relay knows (Hub LFS files, `Repr-Digest`, slices' "
        "`Content-Digest`) are not trusted after a restart until hashed again: those clients "
        "ask for are hashed as they are answered; this checks the rest, one at a time at "
        "`cache_verify_rate`. A mismatch is dropped and counted (`relay_cache_digest_mismatches`).",
    )
    cache_verify_rate: int = _setting(
        64 * 1024 * 1024,
        "bytes/s the background verification (at startup, scrubs) hashes at most",
        group="cache",
        details="Paced so that it never competes with answers; an object a client asks for "
        "while it is being checked is checked at full speed.",
        min=1,
    )
    cache_background_fills: int = _setting(
        8,
        "cache fills that may run with no client waiting",
        group="cache",
        details=(
            "Fills whose clients left, prefetches, stale-while-revalidate revalidations and "
            "slice read-ahead. Past the limit (this, and `cache_background_share`), a fill "
            "whose last client leaves stops at once and stores nothing, and such a fill is "
            "not started: a prefetch is answered 503, a revalidation is left to the next "
            "request. Whatever the limit, a client's request that finds every upstream "
            "connection in use stops the fill without a client for longest and takes its "
            "connection. 0: a fill stops when its last client leaves."
        ),
        min=0,
    )
    cache_background_share: float = _setting(
        0.25,
        "largest share of max_connections that fills with no client waiting may hold",
        group="cache",
        details="At least one fill, unless `cache_background_fills` is 0.",
        positive=True,
        max=1.0,
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
        if self.workers > self.max_connections:
            raise ConfigError(
                f"workers: {self.workers} workers need max_connections >= {self.workers} "
                "(each worker gets an even share of the upstream pool)"
            )
        if self.max_keepalive > self.max_connections:
            object.__setattr__(self, "max_keepalive", self.max_connections)
        try:
            self.trusted_networks()
        except ValueError as exc:
            raise ConfigError(f"trusted_proxies: {exc}") from None
        if not _TOKEN_RE.match(self.client_secret_header):
            raise ConfigError("client_secret_header: not a header name")
        if not _TOKEN_RE.match(self.admin_header):
            raise ConfigError("admin_header: not a header name")
        if self.admin_header.lower() == self.client_secret_header.lower():
            raise ConfigError("admin_header: must differ from client_secret_header")
        if any(c in self.admin_token for c in "\r\n\x00"):
            raise ConfigError("admin_token: must be a single header value")
        if self.data_dir and not self.admin_token and not self.downloads_open:
            raise ConfigError(
                "data_dir: the /downloads API needs an admin credential; set admin_token "
                "(or admin_token_file), or downloads_open = true to let every client use it"
            )
        if sum(1 for r in self.routes if r.preset == "oci" and r.registry_default) > 1:
            raise ConfigError("routes: registry_default is set on more than one oci route")
        if any(r.registry_default and r.preset != "oci" for r in self.routes):
            raise ConfigError("routes: registry_default needs preset = 'oci'")
        if any(r.preset == "oci" for r in self.routes) and any(
            r.prefix.startswith("/v2/") for r in self.routes
        ):
            raise ConfigError("routes: /v2/ belongs to the oci routes' registry API")
        if self.cache_dir and self.cache_max_bytes <= 0:
            raise ConfigError("cache_max_bytes: required (> 0) when cache_dir is set")
        if self.ca_file:
            try:
                self.upstream_ssl_context()
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"ca_file: cannot load {self.ca_file}: {exc}") from None

    def upstream_ssl_context(self) -> ssl.SSLContext | None:
        """The context that verifies https upstreams against `ca_file`; None: the defaults."""
        if not self.ca_file:
            return None
        context = ssl.create_default_context(cafile=self.ca_file)
        context.set_alpn_protocols(["http/1.1"])  # as the transport's own context offers
        return context

    def trusted_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        items = [t.strip() for t in self.trusted_proxies.split(",") if t.strip()]
        return tuple(ipaddress.ip_network(item, strict=False) for item in items)

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
        values.update(_from_strings(cli, source=cli_flag))
        if cli_routes:
            routes = tuple(_parse_route_texts(cli_routes))
        environ = environ or {}
        routes = tuple(r.resolve_credential(environ) for r in routes or ())
        for name in ("client_secret", "signing_key", "admin_token"):
            path = values.get(f"{name}_file")
            if path:
                values[name] = _read_secret_file(path, f"{name}_file")
        return cls(routes=routes, **values)

    def describe(self) -> dict[str, Any]:
        """The effective settings, safe to log: secrets are masked (`masked`)."""
        out = {
            f.name: masked(getattr(self, f.name), secret=f.metadata["secret"]) for f in settings()
        }
        return {"routes": [r.describe() for r in self.routes], **out}


@dataclass(frozen=True, kw_only=True)
class WorkerInfo:
    """Which of the server's processes this one is: `index` of `count` (0 of 1: relay runs as
    one process). With several, `run_dir` is the directory the supervisor made for this run,
    private to the server's processes (mode 0700) and removed when it stops: shared state
    (stream slots, metrics, each worker's peer socket) lives there."""

    index: int = 0
    count: int = 1
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"worker index {self.index} is not below the count {self.count}")
        if self.count > 1 and self.run_dir is None:
            raise ValueError("several workers need a run_dir")

    @property
    def shared(self) -> bool:
        """Whether other workers share this one's port, limits and stores."""
        return self.count > 1

    def peer_socket(self, index: int) -> Path:
        """The Unix socket worker `index` answers its peers on (served by the same app)."""
        assert self.run_dir is not None, "a single process has no peers"
        return self.run_dir / f"worker-{index}.sock"

    def peers(self) -> list[int]:
        """The other workers' indexes."""
        return [i for i in range(self.count) if i != self.index]


SINGLE_PROCESS = WorkerInfo()
"""relay as one process: no supervisor, nothing shared."""


def settings() -> list[dataclasses.Field[Any]]:
    """The scalar settings, in declaration order (routes excluded)."""
    return [f for f in dataclasses.fields(Config) if f.name != "routes"]


def routes_setting() -> dataclasses.Field[Any]:
    """The `routes` field: its text and command-line form (its keys are Route's fields)."""
    return next(f for f in dataclasses.fields(Config) if f.name == "routes")


def env_var(name: str) -> str:
    """The environment variable of setting `name`: RELAY_READ_TIMEOUT for read_timeout."""
    return ENV_PREFIX + name.upper()


def cli_flag(name: str) -> str:
    """The `relay serve` option of setting `name`: --read-timeout for read_timeout."""
    return "--" + name.replace("_", "-")


def setting_type(name: str) -> type:
    hint = typing.get_type_hints(Config)[name]
    assert isinstance(hint, type)
    return hint


def _check(f: dataclasses.Field[Any], kind: Any, value: Any, where: str) -> None:
    meta = f.metadata
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        shown = masked(value, secret=meta["secret"])
        raise ConfigError(f"{where}: expected {kind.__name__}, got {shown!r}")
    if value in meta.get("removed", {}):
        raise ConfigError(f"{where}: {meta['removed'][value]}")
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
            f"{name} ({where}): expected {kind.__name__}, got {masked(text)!r}{hint}"
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
    raw = {f.name: environ[env_var(f.name)] for f in settings() if env_var(f.name) in environ}
    values = _from_strings(raw, source=env_var)
    routes_text = environ.get(env_var("routes"))
    routes = None
    if routes_text is not None and routes_text.strip():
        # A comma separates routes when the next starts with "/" (a prefix), and mirrors
        # when it starts with a URL: "/a/=https://x/,https://y/,/b/=https://z/".
        texts = re.split(r"\s*,\s*(?=/)|\s+", routes_text.strip().strip(","))
        routes = tuple(_parse_route_texts(texts))
    return values, routes


def _parse_route_texts(texts: Sequence[str]) -> list[Route]:
    return [Route.parse(t) for t in texts if t]


_ROUTE_KEYS = {f.name for f in dataclasses.fields(Route)} - {"credential", "registry_credential"}


def _route_from_table(table: dict[str, Any], where: str) -> Route:
    unknown = set(table) - _ROUTE_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if "prefix" not in table:
        raise ConfigError(f"{where}.prefix: required")
    if "upstream" not in table and "upstreams" not in table:
        raise ConfigError(f"{where}.upstream: required (or upstreams)")
    hints = typing.get_type_hints(Route)
    values: dict[str, Any] = {}
    for key, value in table.items():
        kind = hints[key]
        if key == "upstreams":
            values[key] = _mirrors_from_toml(value, f"{where}.{key}")
            continue
        if kind == tuple[str, ...]:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}.{key}: expected a list of strings")
            value = tuple(value)
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{where}.{key}: expected {kind.__name__}, got {value!r}")
        values[key] = value
    return Route(**values)


_MIRROR_KEYS = frozenset({"url", "auth_env", "auth_file", "username_env", "password_env"})


def _login(
    username_env: str, password_env: str, environ: Mapping[str, str], where: str
) -> tuple[str, str] | None:
    """oci: the (user name, password) named by username_env/password_env, None for none."""
    if not username_env:
        return None
    user, password = environ.get(username_env), environ.get(password_env)
    for name, value in ((username_env, user), (password_env, password)):
        if not value:
            raise ConfigError(f"{where}: {name} is not set")
        if any(c in value for c in "\r\n\x00") or not value.isascii():
            raise ConfigError(f"{where}: {name} must be one line of ASCII")
    assert user is not None
    assert password is not None
    if ":" in user:
        raise ConfigError(f"{where}: {username_env}: a user name cannot hold ':'")
    return user, password


def _mirrors_from_toml(value: Any, where: str) -> tuple[Mirror, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of URLs or {{ url = ... }} tables")
    mirrors = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"url": item}
        if not isinstance(item, dict) or "url" not in item:
            raise ConfigError(f"{where}[{i}]: expected a URL or a table with url")
        unknown = set(item) - _MIRROR_KEYS
        if unknown:
            raise ConfigError(f"{where}[{i}]: unknown key {sorted(unknown)[0]!r}")
        if not all(isinstance(v, str) for v in item.values()):
            raise ConfigError(f"{where}[{i}]: expected strings")
        mirrors.append(Mirror(**item))
    return tuple(mirrors)


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
            parsed.append(_route_from_table(table, where))
        routes = tuple(parsed)
    return values, routes
