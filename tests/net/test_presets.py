from __future__ import annotations

from relay.config import Route
from relay.net.presets import index_accept

PYPI = Route(prefix="/pypi/", upstream="https://pypi.example/", preset="pypi")
NPM = Route(prefix="/npm/", upstream="https://npm.example/", preset="npm")

JSON = "application/vnd.pypi.simple.v1+json"
PIP_ACCEPT = (
    "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html; q=0.1, "
    "text/html; q=0.01"
)


def test_index_accept_keeps_the_presets_media_ranges_with_their_q() -> None:
    assert index_accept(PYPI, PIP_ACCEPT) == (
        "application/vnd.pypi.simple.v1+json,application/vnd.pypi.simple.v1+html;q=0.1,"
        "text/html;q=0.01"
    )


def test_index_accept_normalises_spelling_but_not_meaning() -> None:
    """Case, spaces, q=1 spelled out, other parameters and unknown types do not split a
    page's variant; q-values and order (a tie-break) do."""
    same = "Application/VND.pypi.simple.v1+JSON;q=1.0 ;charset=utf-8,image/png,text/html;q=0.010"
    assert index_accept(PYPI, same) == index_accept(
        PYPI, "application/vnd.pypi.simple.v1+json, text/html;q=0.01"
    )
    assert index_accept(PYPI, "text/html") != index_accept(PYPI, PIP_ACCEPT)
    assert index_accept(PYPI, "text/html;q=0.5") != index_accept(PYPI, "text/html")
    assert index_accept(PYPI, f"text/html, {JSON}") != index_accept(PYPI, f"{JSON}, text/html")


def test_index_accept_keeps_wildcards_and_q_zero() -> None:
    assert index_accept(PYPI, "*/*") == "*/*"
    assert index_accept(PYPI, "text/html;q=0, */*;q=0.5") == "text/html;q=0,*/*;q=0.5"
    assert index_accept(PYPI, None) == ""
    assert index_accept(PYPI, "text/html;q=junk") == "text/html"


def test_index_accept_per_preset() -> None:
    npm = "application/vnd.npm.install-v1+json; q=1.0, application/json; q=0.8, */*"
    assert index_accept(NPM, npm) == (
        "application/vnd.npm.install-v1+json,application/json;q=0.8,*/*"
    )
    # An npm route does not know PyPI's types.
    assert index_accept(NPM, "application/vnd.pypi.simple.v1+json") == ""
