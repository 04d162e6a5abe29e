from __future__ import annotations

import json
import subprocess
import sys

import pytest

from relay import errors
from relay.errors import (
    BadPath,
    ClientError,
    Conflict,
    DownloadsError,
    InsufficientStorage,
    InvalidField,
    NotFound,
    PoolExhausted,
    RelayError,
    TooManyStreams,
    Unavailable,
    UpstreamTimeout,
    error_response,
    json_error_response,
    render_json,
    render_text,
)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (InvalidField("size", "bad"), 422),
        (Conflict("taken"), 409),
        (NotFound("no such download"), 404),
        (InsufficientStorage("full"), 507),
        (Unavailable("store down"), 503),
        (DownloadsError("body: not valid JSON"), 400),
        (DownloadsError("too large", status_code=413), 413),
    ],
)
def test_downloads_errors_are_members_of_the_one_tree(exc: DownloadsError, status: int) -> None:
    """Every downloads API error is a RelayError with its status."""
    assert isinstance(exc, RelayError)
    assert exc.status_code == status


def test_render_text_is_status_and_reason() -> None:
    """Relayed requests get `"{status} {reason}\\n"` as text/plain, with the error's headers."""
    rendered = render_text(PoolExhausted("no upstream connection free"))
    assert rendered.status == 503
    assert rendered.body == b"503 no upstream connection free\n"
    assert rendered.headers == {"Retry-After": "1"}
    assert rendered.media_type == "text/plain"


def test_render_text_does_not_share_the_class_headers() -> None:
    """Changing a rendered error's headers never changes the class default."""
    render_text(TooManyStreams("slow down")).headers["X"] = "y"
    assert TooManyStreams.headers == {"Retry-After": "1"}


def test_render_json_names_the_field() -> None:
    """`{"error": "field: reason", "field": field}`, compact, UTF-8, extra headers added."""
    rendered = render_json(InvalidField("name", "ungültig"), {"Cache-Control": "no-store"})
    assert rendered.status == 422
    assert rendered.media_type == "application/json"
    assert rendered.headers == {"Cache-Control": "no-store"}
    assert rendered.body == '{"error":"name: ungültig","field":"name"}'.encode()


def test_render_json_without_a_field() -> None:
    """A server error without a field renders as `{"error": reason}`."""
    rendered = render_json(errors.Unauthorized("client authentication required"))
    assert json.loads(rendered.body) == {"error": "client authentication required"}
    assert rendered.status == 401


def test_error_response_is_plain_text() -> None:
    """The Starlette form carries status, headers, body and text/plain; charset=utf-8."""
    response = error_response(UpstreamTimeout("upstream sent no response headers in time"))
    assert response.status_code == 504
    assert response.body == b"504 upstream sent no response headers in time\n"
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-length"] == str(len(response.body))


def test_json_error_response_is_json() -> None:
    """The Starlette form of the JSON rendering keeps application/json and extra headers."""
    response = json_error_response(BadPath("bad"), {"Cache-Control": "no-store"})
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    assert json.loads(bytes(response.body)) == {"error": "bad"}
    assert isinstance(BadPath("x"), ClientError)


def test_importing_errors_does_not_import_starlette() -> None:
    """relay.errors stays light: Starlette is imported only when a response is built."""
    code = "import sys, relay.errors; print('starlette' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"
