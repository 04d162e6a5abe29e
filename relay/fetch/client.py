"""relay fetch's requests: httpx's blocking client, handed to the (async) engine as an Opener.

The engine (`relay.transfer`) is async because it also runs inside the server. relay fetch is
one task with nothing to run beside it, so it sends requests and reads bodies in place, with
the blocking client: httpx's async client reads through anyio, one loop iteration and
checkpoint per 64 KiB read, which measured about 1 CPU-second more per GiB here than the
blocking client (and so a slower `relay fetch`). Blocking the loop costs nothing in this
process: the one other piece of work, writing the partial file's blocks, runs in a worker
thread either way, started without waiting for the loop.

Failures are sorted here: dropped, reset, refused or timed out is worth another attempt
(`AttemptFailed`); too many redirects is an HTTP error; anything else ends the run.

Mirrors (`--mirror URL`, the same file elsewhere) follow a route's rules (`relay.net.mirrors`):
the user's Authorization and Cookie (`-H`) go to URL's origin only; before the first byte the
next URL is asked on 404/410, or with `--failover any` also on a connect error, timeout, 5xx
or 429; a continuation goes to the URL that sent the first bytes,
or, when a sha256 pins the file (`--sha256`, or one the server announced: both checked before
FILE is written) and the failover is "any", to the next URLs first, without If-Range.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import httpx

from relay.fetch.errors import HTTPStatusError, TransferFailed
from relay.http.continuation import CONTINUATION, SWITCHED_FROM
from relay.http.digests import DigestConflict, upstream_sha256
from relay.net.mirrors import failed_status, falls_through
from relay.net.redirects import same_origin
from relay.transfer import describe
from relay.transfer.errors import AttemptFailed

MAX_REDIRECTS = 10

# The user's headers that are for URL's origin only: a mirror elsewhere is asked without them,
# as httpx asks a redirect's other origin.
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

# Dropped, reset, refused, timed out, short or malformed body: worth another try.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class BlockingOpener:
    """Sends `GET url` (or a mirror's) with the user's headers (and the engine's Range,
    If-Range)."""

    def __init__(
        self,
        client: httpx.Client,
        url: str,
        headers: Sequence[tuple[str, str]],
        *,
        mirrors: Sequence[str] = (),
        failover: str = "not-found",
        sha256: str | None = None,
    ) -> None:
        self._client = client
        self._urls = [url, *mirrors]
        self._headers = {"Accept-Encoding": "identity", **dict(headers)}
        first = httpx.URL(url)
        self._foreign = [not same_origin(httpx.URL(u), first) for u in self._urls]
        self._failover = failover
        self._pinned = sha256
        self._current = 0  # the URL whose answer the bytes had came from

    async def __call__(self, extra: list[tuple[str, str]]) -> httpx.Response:
        n = len(self._urls)
        continues = any(name.lower() == "range" for name, _ in extra)
        if not continues:
            order = list(range(n))
        elif self._pinned and self._failover == "any":
            order = [(self._current + k) % n for k in range(1, n + 1)]
        else:
            order = [self._current]
        for k, index in enumerate(order):
            last = k == len(order) - 1
            headers = self._headers | dict(extra)
            if continues and index != self._current:
                headers = {k: v for k, v in headers.items() if k.lower() != "if-range"}
            if self._foreign[index]:
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            request = self._client.build_request("GET", self._urls[index], headers=headers)
            if continues:
                request.extensions[CONTINUATION] = self._pinned or ""
            try:
                response = self._send(request)
            except AttemptFailed:
                if last or self._failover != "any":
                    raise
                continue
            status = response.status_code
            if not last and (
                falls_through(self._failover, status)
                or (continues and index != self._current and failed_status(status))
            ):
                await response.aclose()
                continue
            if continues and index != self._current:
                response.extensions[SWITCHED_FROM] = self._current
            if status in (200, 206):
                self._current = index
            if status == 200 and self._pinned is None:
                with contextlib.suppress(DigestConflict):
                    self._pinned = upstream_sha256(response.headers)
            return response
        raise AssertionError("unreachable: the last URL's answer is returned")

    def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            sent = self._client.send(request, stream=True)
        except _TRANSIENT as exc:
            raise AttemptFailed(describe(exc)) from exc
        except httpx.TooManyRedirects as exc:
            raise HTTPStatusError(f"more than {MAX_REDIRECTS} redirects") from exc
        except httpx.HTTPError as exc:
            raise TransferFailed(describe(exc)) from exc
        return httpx.Response(
            sent.status_code,
            headers=sent.headers,
            stream=_ReadInPlace(sent),
            request=sent.request,
            extensions=sent.extensions,
        )


class _ReadInPlace(httpx.AsyncByteStream):
    """A blocking response's raw body as an async stream (read on the caller's thread)."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for chunk in self._response.iter_raw():
            yield chunk

    async def aclose(self) -> None:
        self._response.close()
