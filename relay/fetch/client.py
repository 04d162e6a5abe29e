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
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import httpx

from relay.fetch.errors import HTTPStatusError, TransferFailed
from relay.transfer import describe
from relay.transfer.errors import AttemptFailed

MAX_REDIRECTS = 10

# Dropped, reset, refused, timed out, short or malformed body: worth another try.
_TRANSIENT = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


class BlockingOpener:
    """Sends `GET url` with the user's headers (and the engine's Range, If-Range)."""

    def __init__(self, client: httpx.Client, url: str, headers: Sequence[tuple[str, str]]) -> None:
        self._client = client
        self._url = url
        self._headers = {"Accept-Encoding": "identity", **dict(headers)}

    async def __call__(self, extra: list[tuple[str, str]]) -> httpx.Response:
        request = self._client.build_request("GET", self._url, headers=self._headers | dict(extra))
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
