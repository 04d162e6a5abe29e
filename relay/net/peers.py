"""Asking the server's other worker processes (workers > 1): one request to each live peer.

Every worker serves its app on a private Unix socket in the run directory as well as on the
public port (`WorkerInfo.peer_socket`), so what one worker learns (a purge, a prefetch, a
scrape) can be handed to the others by an ordinary request. The run directory is mode 0700:
only the server's own processes reach these sockets. A request that came in on one is a peer
request (`is_peer_request`): its handler answers for its own worker only and never fans out
again.

A peer that does not answer within `timeout` (dead, restarting, its loop stuck) is reported
as an error for its index, never waited on longer: a scrape or a purge is never held up by one
sick worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from relay.config import WorkerInfo
from relay.types import Scope

PEER_TIMEOUT = 2.0
"""Seconds a peer has to answer one fanned-out request."""


@dataclass(frozen=True, slots=True)
class PeerAnswer:
    """One peer's answer: its response (body read), or why there is none."""

    index: int
    response: httpx.Response | None
    error: str | None = None


def is_peer_request(scope: Scope) -> bool:
    """Whether the request came in on this worker's peer socket (from another worker)."""
    server = scope.get("server")
    return server is not None and server[1] is None and str(server[0]).endswith(".sock")


async def ask_peers(
    worker: WorkerInfo,
    method: str,
    path: str,
    *,
    headers: Mapping[str, str] | None = None,
    content: bytes | None = None,
    timeout: float = PEER_TIMEOUT,
) -> list[PeerAnswer]:
    """Send one request to every other worker at once; their answers in index order."""
    if not worker.shared:
        return []
    return list(
        await asyncio.gather(
            *(
                _ask(worker, index, method, path, headers, content, timeout)
                for index in worker.peers()
            )
        )
    )


async def _ask(
    worker: WorkerInfo,
    index: int,
    method: str,
    path: str,
    headers: Mapping[str, str] | None,
    content: bytes | None,
    timeout: float,
) -> PeerAnswer:
    transport = httpx.AsyncHTTPTransport(uds=str(worker.peer_socket(index)))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://relay-peer", timeout=timeout, trust_env=False
        ) as client:
            response = await client.request(method, path, headers=headers, content=content)
    except httpx.HTTPError as exc:
        return PeerAnswer(index, None, f"{type(exc).__name__}: {exc}")
    return PeerAnswer(index, response)
