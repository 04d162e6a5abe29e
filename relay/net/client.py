"""The one shared upstream client: an `httpx.AsyncClient` that forgets cookies and sends
relay's requests without the machinery relay does not use.

relay's requests are streamed, carry no client auth, follow no redirects inside httpx (relay
follows them itself, to allowed hosts only) and have no event hooks. For those, `send` hands
the request straight to the client's transport, as httpx's own `_send_single_request` does,
and skips the auth-flow generator, the redirect loop and the hook loops around it: ~10% of
a small request's CPU. Any other use of the client takes httpx's full path. The one thing
such a response lacks is `elapsed` (httpx sets it when its wrapped stream closes); relay
measures its own times.
"""

from __future__ import annotations

from typing import Any

import httpx

from relay.net.httpx_compat import transport_for


class _NoCookies(httpx.Cookies):
    def extract_cookies(self, response: httpx.Response) -> None:
        """Nothing is stored; httpx would otherwise parse every response into a cookie jar."""


_NO_COOKIES = _NoCookies()


class UpstreamClient(httpx.AsyncClient):
    """The one shared client. It serves every user, so it never remembers an upstream's
    cookies: its jar is always empty and storing into it costs nothing."""

    @property
    def cookies(self) -> httpx.Cookies:
        return _NO_COOKIES

    @cookies.setter
    def cookies(self, cookies: object) -> None:
        pass

    async def send(
        self,
        request: httpx.Request,
        *,
        stream: bool = False,
        **options: Any,  # httpx's auth= and follow_redirects=, passed on as they came
    ) -> httpx.Response:
        follows = options.get("follow_redirects", httpx.USE_CLIENT_DEFAULT)
        if follows is httpx.USE_CLIENT_DEFAULT:
            follows = self.follow_redirects
        if (
            not stream
            or follows
            or self.is_closed
            or options.get("auth", httpx.USE_CLIENT_DEFAULT) is not httpx.USE_CLIENT_DEFAULT
            or self.auth is not None
            or self.event_hooks["request"]
            or self.event_hooks["response"]
            or "timeout" not in request.extensions
        ):
            return await super().send(request, stream=stream, **options)
        transport = transport_for(self, request.url)
        try:
            response = await transport.handle_async_request(request)
        except httpx.RequestError as exc:
            exc.request = request  # as httpx's request_context() does
            raise
        response.request = request
        return response
