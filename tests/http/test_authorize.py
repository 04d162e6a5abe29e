"""A request made from another (a retry, a continuation, another mirror's copy, its
unconditional form) is authorized as the one it was made from (`relay.http.authorize`)."""

from __future__ import annotations

import httpx

from relay.http.authorize import AUTHORIZER, authorized_as, authorizer_of, with_credential
from relay.http.continuation import CONTINUATION
from relay.http.resume import mark_continuation


class _Kept:
    def known(self, mirror: int) -> str | None:
        return f"Bearer m{mirror}"

    async def renew(self, mirror: int, refused: httpx.Response) -> str:
        return f"Bearer new-m{mirror}"


def test_a_request_made_from_another_keeps_its_authorizer_and_only_that() -> None:
    kept = _Kept()
    source = httpx.Request("GET", "https://r.test/v2/a/blobs/sha256:0")
    source.extensions[AUTHORIZER] = kept
    made = authorized_as(httpx.Request("GET", source.url), source)
    assert authorizer_of(made) is kept
    plain = authorized_as(httpx.Request("GET", source.url), httpx.Request("GET", source.url))
    assert authorizer_of(plain) is None
    resumed = mark_continuation(httpx.Request("GET", source.url), "ab" * 32, source)
    assert resumed.extensions[CONTINUATION] == "ab" * 32
    assert authorizer_of(resumed) is kept
    assert authorizer_of(mark_continuation(httpx.Request("GET", source.url), None)) is None


def test_with_credential_leaves_one_authorization_or_none() -> None:
    headers = [("accept", "*/*"), ("Authorization", "Bearer old"), ("authorization", "x")]
    assert with_credential(headers, "Bearer new") == [
        ("accept", "*/*"),
        ("authorization", "Bearer new"),
    ]
    assert with_credential(headers, None) == [("accept", "*/*")]
