"""Talking to upstreams: building the request, opening the stream, translating failures."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import httpx

from relay.config import Config
from relay.errors import PoolExhausted, UpstreamError, UpstreamTimeout, UpstreamUnavailable

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def map_upstream_errors() -> Iterator[None]:
    """The one place where httpx errors become the statuses relay answers with."""
    try:
        yield
    except httpx.PoolTimeout as exc:
        raise PoolExhausted("no upstream connection free; retry shortly") from exc
    except httpx.TimeoutException as exc:
        phase = "connecting to" if isinstance(exc, httpx.ConnectTimeout) else "waiting for"
        raise UpstreamTimeout(f"timed out {phase} the upstream") from exc
    except httpx.ConnectError as exc:
        raise UpstreamUnavailable(f"cannot connect to the upstream: {_cause(exc)}") from exc
    except httpx.HTTPError as exc:
        raise UpstreamUnavailable(f"upstream failed: {_cause(exc)}") from exc


def _cause(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


class Upstream:
    """Opens upstream responses as streams on the one shared client."""

    def __init__(self, client: httpx.AsyncClient, config: Config) -> None:
        self._client = client
        self._timeout = httpx.Timeout(
            connect=config.connect_timeout,
            read=config.read_timeout,
            write=config.read_timeout,
            pool=config.pool_timeout,
        ).as_dict()

    def build_request(self, method: str, url: str, headers: list[tuple[str, str]]) -> httpx.Request:
        # Built directly, not with client.build_request, so that httpx's default headers
        # (Accept-Encoding: gzip, its User-Agent) are never merged in.
        return httpx.Request(method, url, headers=headers, extensions={"timeout": self._timeout})

    async def open(self, request: httpx.Request) -> httpx.Response:
        """Send the request and return once headers arrived; the caller must close the body."""
        try:
            with map_upstream_errors():
                return await self._client.send(request, stream=True)
        except UpstreamError as exc:
            logger.warning(
                "upstream %s %s failed: %s",
                request.method,
                _safe_url(request.url),
                exc.reason,
            )
            raise


def _safe_url(url: httpx.URL) -> str:
    """The URL without its query, which may carry signatures or tokens."""
    return str(url.copy_with(query=None))
