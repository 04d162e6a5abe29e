"""The admin credential: one for every admin endpoint (the downloads API, cache purge).

Pure (no I/O, no framework), so every program can check it without importing the server.
"""

from __future__ import annotations

import hmac

from relay.errors import Forbidden, Unauthorized


class AdminAuth:
    """The admin credential, for relay's admin endpoints; one for every such endpoint."""

    def __init__(self, *, token: str, header: str = "X-Relay-Admin-Token") -> None:
        self._token = token.encode()
        self._header = header.lower().encode()

    def __repr__(self) -> str:
        return f"AdminAuth(header={self._header.decode()!r}, token=***)"

    def check(self, headers: list[tuple[bytes, bytes]]) -> None:
        """Accept the request or raise Unauthorized (no credential) or Forbidden (wrong one)."""
        given = [value for name, value in headers if name.lower() == self._header]
        if not given:
            raise Unauthorized(f"admin credential required in {self._header.decode()}")
        # An empty token (none configured) never matches: compare_digest of b"" and b"" is
        # true, so that case is refused explicitly.
        if len(given) != 1 or not self._token or not hmac.compare_digest(given[0], self._token):
            raise Forbidden("wrong admin credential")
