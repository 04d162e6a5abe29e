"""Several upstreams per route: which mirror is asked, when the next one is, and which rest.

Sans-IO: the rules only. `relay.net.upstream.Upstream.open` does the I/O for relayed requests,
cache fills, slice fills and downloads to disk alike; `relay fetch` applies the same rules to
its own mirror URLs (`relay.fetch.client`).

Before the first byte of a body went to the client, a failed answer moves to the next mirror
when the route's `failover` policy allows it:

- "not-found": only on 404 or 410 (Go's GOPROXY ","): during an outage of the first mirror a
  name is never sent to the next;
- "any": also on a connect error, a timeout, a 5xx or a 429 (GOPROXY "|").

Never on 401, 403, 407 or any other 4xx: a refusal is the answer. The last mirror's answer is
the client's, whatever it is.

Passive health (nginx's `max_fails`, `fail_timeout`), for routes with several mirrors only: a
mirror that fails `max_fails` times within `fail_timeout` seconds rests for `fail_timeout`
seconds, then is asked again; one more failure and it rests again, a success and it is well.
A resting mirror is skipped under "any" (under "not-found" skipping it would send the name to
the next mirror, so it is still asked); when every mirror of a route rests, the route answers
503 at once naming the cause (`MirrorsDown`). State is kept per configured mirror, nothing
else: it is bounded by the configuration.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import httpx

from relay.config import Mirror, Route
from relay.errors import MirrorsDown, PoolExhausted, UpstreamError, UpstreamRefused
from relay.http.digests import DigestConflict, upstream_sha256
from relay.net.presets import linked_sha256

NOT_FOUND_STATUSES = frozenset({404, 410})

Monotonic = Callable[[], float]
"""The clock passive health reads (injected: tests move a manual clock)."""


def failed_status(status: int) -> bool:
    """An answer that counts as the mirror failing (passive health) and that "any" passes on."""
    return status == 429 or 500 <= status <= 599


def falls_through(policy: str, status: int) -> bool:
    """Whether an answer with `status` sends the request on to the next mirror."""
    if status in NOT_FOUND_STATUSES:
        return True
    return policy == "any" and failed_status(status)


def error_falls_through(policy: str, error: UpstreamError) -> bool:
    """Whether a failure to get an answer (refused, reset, timed out) moves to the next
    mirror. A full pool is relay's own state, not the mirror's: never; nor a refusal of the
    request itself (as a 403 does not)."""
    return policy == "any" and not isinstance(error, PoolExhausted | UpstreamRefused)


def error_counts(error: UpstreamError) -> bool:
    """Whether a failure to get an answer counts against the mirror's health: not relay's
    own state, nor an answer about the request's name (one client's input)."""
    return not isinstance(error, PoolExhausted | MirrorsDown | UpstreamRefused)


# Paths that name their bytes by SHA-256: an OCI blob, a Debian by-hash file.
_DIGEST_PATHS = (
    re.compile(r"/blobs/sha256(?::|%3[aA])([0-9a-f]{64})$"),
    re.compile(r"/by-hash/SHA256/([0-9a-f]{64})$"),
)


def path_sha256(path: str) -> str | None:
    """The SHA-256 a URL path names its bytes by (OCI blob, Debian by-hash), if any."""
    for pattern in _DIGEST_PATHS:
        match = pattern.search(path)
        if match:
            return match.group(1)
    return None


def named_sha256(route: Route, path: str) -> str | None:
    """The SHA-256 a path below `route` names its bytes by, where the route's preset makes
    that a promise (a Debian `by-hash/SHA256/<hex>` file): a cache fill of it is stored
    only once its bytes match, whichever mirror sent them."""
    return path_sha256(path) if route.preset == "debian" else None


def pinned_sha256(
    route: Route, path: str, headers: httpx.Headers, known: str | None = None
) -> str | None:
    """The SHA-256 that pins a whole body's identity across the route's mirrors, or None
    when it may only be continued from the mirror that sent it: a route with one mirror or
    failover "not-found", or no digest known (the path's, `known` (a job's expected
    sha256, the Hub's), the upstream's Repr-Digest/Digest or X-Linked-Etag), or two that
    disagree."""
    if len(route.upstreams) < 2 or route.failover != "any":
        return None
    try:
        found = {path_sha256(path), known, upstream_sha256(headers), linked_sha256(headers)}
    except DigestConflict:
        return None
    found.discard(None)
    return found.pop() if len(found) == 1 else None


class MirrorHealth:
    """One mirror's passive health."""

    __slots__ = (
        "_fails",
        "down_until",
        "fail_timeout",
        "failures",
        "fall_throughs",
        "host",
        "index",
        "last_cause",
        "max_fails",
    )

    def __init__(self, index: int, mirror: Mirror, max_fails: int, fail_timeout: float) -> None:
        self.index = index
        self.host = mirror.host
        self.max_fails = max_fails
        self.fail_timeout = fail_timeout
        self._fails: collections.deque[float] = collections.deque(maxlen=max(max_fails, 1))
        self.down_until: float | None = None
        """While resting: when it is asked again. After that, until its next answer, it is on
        probation: one failure and it rests again."""
        self.failures = 0
        """Failures counted since start (for /metrics)."""
        self.fall_throughs = 0
        """Requests passed on from this mirror to the next (for /metrics)."""
        self.last_cause = ""

    def resting(self, now: float) -> bool:
        return self.down_until is not None and now < self.down_until

    def failed(self, now: float, cause: str) -> None:
        self.failures += 1
        self.last_cause = cause
        if self.max_fails == 0:
            return
        if self.down_until is not None:
            if now >= self.down_until:  # the first request after its rest failed too
                self.down_until = now + self.fail_timeout
            return
        while self._fails and self._fails[0] <= now - self.fail_timeout:
            self._fails.popleft()
        self._fails.append(now)
        if len(self._fails) >= self.max_fails:
            self.down_until = now + self.fail_timeout
            self._fails.clear()

    def succeeded(self) -> None:
        self._fails.clear()
        self.down_until = None

    def describe(self, now: float) -> str:
        if self.resting(now):
            assert self.down_until is not None
            return f"resting for {self.down_until - now:.0f}s after {self.last_cause or 'failures'}"
        if self.down_until is not None:
            return "on probation (asked again after resting)"
        return "up"


@dataclass(frozen=True, slots=True)
class Attempt:
    """A mirror to ask: its index in the route's `upstreams` and its base URL."""

    index: int
    base: str


class RouteMirrors:
    """The mirrors of one route and their health."""

    def __init__(self, route: Route, clock: Monotonic) -> None:
        self.route = route
        self.prefix = route.prefix
        self.policy = route.failover
        self.hedge_after = route.hedge_after
        self._clock = clock
        self.health = [
            MirrorHealth(i, m, route.max_fails, route.fail_timeout)
            for i, m in enumerate(route.upstreams)
        ]

    @property
    def several(self) -> bool:
        return len(self.health) > 1

    def order(self, first: int = 0) -> list[Attempt]:
        """The mirrors to ask, in order, starting at `first` and wrapping around (resting
        ones skipped under "any"); MirrorsDown when every mirror rests."""
        n = len(self.health)
        indices = [(first + k) % n for k in range(n)] if first else list(range(n))
        if not self.several:
            return [Attempt(0, self.route.upstreams[0].url)]
        now = self._clock()
        awake = [i for i in indices if not self.health[i].resting(now)]
        if not awake:
            soonest = min(h.down_until or now for h in self.health)
            causes = "; ".join(
                f"mirror {h.index + 1} ({h.host}): {h.last_cause or 'failing'}" for h in self.health
            )
            raise MirrorsDown(
                f"every mirror of {self.prefix} is resting after failures ({causes})",
                retry_after=soonest - now,
            )
        if self.policy == "any":
            indices = awake
        return [Attempt(i, self.route.upstreams[i].url) for i in indices]

    def skipped(self, index: int) -> bool:
        """Whether mirror `index` is passed over now (resting, under "any")."""
        return self.several and self.policy == "any" and self.health[index].resting(self._clock())

    def failed(self, index: int, cause: str) -> None:
        if self.several:
            self.health[index].failed(self._clock(), cause)

    def succeeded(self, index: int) -> None:
        if self.several:
            self.health[index].succeeded()

    def passed_on(self, index: int) -> None:
        self.health[index].fall_throughs += 1

    def index_of(self, url: str) -> int | None:
        """The mirror whose base `url` is below (None: none of them, e.g. a redirect's)."""
        best: int | None = None
        for i, mirror in enumerate(self.route.upstreams):
            if url.startswith(mirror.url) and (
                best is None or len(mirror.url) > len(self.route.upstreams[best].url)
            ):
                best = i
        return best


class MirrorBoard:
    """Every route's mirrors, made once from the configuration (bounded by it)."""

    def __init__(self, routes: Iterable[Route], clock: Monotonic) -> None:
        self._clock = clock
        self.routes = {route.prefix: RouteMirrors(route, clock) for route in routes}

    def now(self) -> float:
        return self._clock()

    def of(self, route: Route) -> RouteMirrors:
        mirrors = self.routes.get(route.prefix)
        if mirrors is None or (
            mirrors.route is not route and mirrors.route.upstreams != route.upstreams
        ):
            # A route made outside the configuration (tests): its own, unshared state.
            mirrors = RouteMirrors(route, self._clock)
        return mirrors

    def report(self) -> list[str]:
        """One line per mirror of each route with several (for /readyz)."""
        now = self.now()
        return [
            f"mirror {r.prefix} {h.index + 1} {h.host}: {h.describe(now)}"
            for r in self.routes.values()
            if r.several
            for h in r.health
        ]


__all__ = [
    "NOT_FOUND_STATUSES",
    "Attempt",
    "MirrorBoard",
    "MirrorHealth",
    "Monotonic",
    "RouteMirrors",
    "error_counts",
    "error_falls_through",
    "failed_status",
    "falls_through",
    "named_sha256",
    "path_sha256",
    "pinned_sha256",
]
