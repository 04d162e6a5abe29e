"""Each compat module fails loudly, naming the missing part, when a dependency lacks a private
part relay relies on: the part is monkeypatched away and the module's check is run again."""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable

import aiohttp
import httpx
import pytest
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import BaseConnector

from relay.net import httpx_compat
from relay.net.compat import IncompatibleDependency
from relay.net.transports import aiohttp_compat
from relay.server import uvicorn_compat
from relay.server.run import RelayHttpToolsProtocol
from relay.server.uvicorn_compat import HttpToolsProtocol, RequestResponseCycle


def _without(function: Callable[..., object], attribute: str) -> Callable[..., None]:
    """A stand-in for `function` (a method) that names every attribute it names except
    `attribute`, as a dependency that renamed it would."""
    names = [n for n in function.__code__.co_names if n != attribute and n.isidentifier()]
    body = "".join(f"    self.{name} = None\n" for name in names) or "    pass\n"
    namespace: dict[str, Callable[..., None]] = {}
    exec(f"def stand_in(self, *args, **kwargs):\n{body}", namespace)
    return namespace["stand_in"]


def _init_without(cls: type, attribute: str) -> Callable[..., None]:
    return _without(cls.__init__, attribute)  # type: ignore[misc]


def test_compat_checks_pass_on_the_installed_dependencies() -> None:
    for module in (aiohttp_compat, httpx_compat, uvicorn_compat):
        module.check()


@pytest.mark.parametrize("attribute", ["_factory", "_conns", "_acquired"])
def test_compat_aiohttp_connector_attribute_missing(
    monkeypatch: pytest.MonkeyPatch, attribute: str
) -> None:
    monkeypatch.setattr(BaseConnector, "__init__", _init_without(BaseConnector, attribute))
    with pytest.raises(aiohttp_compat.AiohttpIncompatible, match=f"BaseConnector.{attribute}"):
        aiohttp_compat.check()


def test_compat_aiohttp_drop_timeout_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(ResponseHandler, "_drop_timeout")
    with pytest.raises(aiohttp_compat.AiohttpIncompatible, match=r"ResponseHandler._drop_timeout"):
        aiohttp_compat.check()


def test_compat_aiohttp_stream_reader_size_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory tests' probe: without `_size` they would measure nothing."""
    reader = aiohttp.StreamReader
    monkeypatch.setattr(reader, "__init__", _init_without(reader, "_size"))
    with pytest.raises(aiohttp_compat.AiohttpIncompatible, match=r"StreamReader._size"):
        aiohttp_compat.check()


def test_compat_httpx_transport_for_url_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(httpx.AsyncClient, "_transport_for_url")
    with pytest.raises(httpx_compat.HttpxIncompatible, match=r"AsyncClient._transport_for_url"):
        httpx_compat.check()


def test_compat_httpx_uri_reference_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    original = httpx.URL.__init__

    def renamed(self: httpx.URL, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        self._uri_ref = vars(self).pop("_uri_reference")  # type: ignore[attr-defined]

    monkeypatch.setattr(httpx.URL, "__init__", renamed)
    with pytest.raises(httpx_compat.HttpxIncompatible, match=r"URL._uri_reference"):
        httpx_compat.check()


def test_compat_httpx_with_path_and_query_builds_the_url_httpx_would() -> None:
    base = httpx.URL("https://files.test:8443/pub")
    url = httpx_compat.with_path_and_query(base, "/a%20b/c", "x=1&y=2")
    assert url == httpx.URL("https://files.test:8443/pub/a%20b/c?x=1&y=2")
    assert (url.host, url.port, url.raw_path) == ("files.test", 8443, b"/pub/a%20b/c?x=1&y=2")


@pytest.mark.parametrize("method", uvicorn_compat.OVERRIDDEN)
def test_compat_uvicorn_overridden_method_missing(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A method relay overrides that uvicorn no longer has would never be called: relay's
    431/408/400 defences in it would be off without a word."""
    monkeypatch.delattr(HttpToolsProtocol, method)
    with pytest.raises(uvicorn_compat.UvicornIncompatible, match=f"HttpToolsProtocol.{method}"):
        uvicorn_compat.check()


@pytest.mark.parametrize(
    ("method", "attribute"),
    [(m, a) for m, names in uvicorn_compat.PROTOCOL_ATTRIBUTES.items() for a in names],
)
def test_compat_uvicorn_protocol_attribute_missing(
    monkeypatch: pytest.MonkeyPatch, method: str, attribute: str
) -> None:
    without = _without(getattr(HttpToolsProtocol, method), attribute)
    monkeypatch.setattr(HttpToolsProtocol, method, without)
    with pytest.raises(uvicorn_compat.UvicornIncompatible, match=f"HttpToolsProtocol.{attribute}"):
        uvicorn_compat.check()


@pytest.mark.parametrize("attribute", uvicorn_compat.CYCLE_ATTRIBUTES)
def test_compat_uvicorn_cycle_attribute_missing(
    monkeypatch: pytest.MonkeyPatch, attribute: str
) -> None:
    init = _init_without(RequestResponseCycle, attribute)
    monkeypatch.setattr(RequestResponseCycle, "__init__", init)
    with pytest.raises(
        uvicorn_compat.UvicornIncompatible, match=f"RequestResponseCycle.{attribute}"
    ):
        uvicorn_compat.check()


@pytest.mark.parametrize(
    ("method", "attribute"),
    [(m, a) for m, names in uvicorn_compat.CYCLE_READS.items() for a in names],
)
def test_compat_uvicorn_cycle_use_missing(
    monkeypatch: pytest.MonkeyPatch, method: str, attribute: str
) -> None:
    """A cycle that ran the app with another send, or counted a body otherwise, would bypass
    or mis-frame relay's zero-copy sends."""
    without = _without(getattr(RequestResponseCycle, method), attribute)
    monkeypatch.setattr(RequestResponseCycle, method, without)
    with pytest.raises(
        uvicorn_compat.UvicornIncompatible, match=f"RequestResponseCycle.{method} using {attribute}"
    ):
        uvicorn_compat.check()


def test_compat_uvicorn_flow_control_drain_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(uvicorn_compat.FlowControl, "drain")
    with pytest.raises(uvicorn_compat.UvicornIncompatible, match=r"FlowControl.drain"):
        uvicorn_compat.check()


def test_compat_uvicorn_checks_every_method_relay_overrides() -> None:
    """A new override in relay's protocol must be added to the checked list."""
    base_methods = {
        name for name in vars(HttpToolsProtocol) if callable(getattr(HttpToolsProtocol, name))
    }
    overridden = {name for name in vars(RelayHttpToolsProtocol) if name in base_methods}
    assert overridden == set(uvicorn_compat.OVERRIDDEN)


def test_compat_errors_share_one_base_and_are_import_errors() -> None:
    for error in (
        aiohttp_compat.AiohttpIncompatible,
        httpx_compat.HttpxIncompatible,
        uvicorn_compat.UvicornIncompatible,
    ):
        assert issubclass(error, IncompatibleDependency)
        assert issubclass(error, ImportError)


@pytest.mark.parametrize("method", aiohttp_compat.OVERRIDDEN + aiohttp_compat.CALLED)
def test_compat_aiohttp_protocol_method_missing(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A ResponseHandler method relay's protocol overrides that aiohttp no longer has would
    never be called: the head deadline or the idle-connection rules in it would be off."""
    for klass in ResponseHandler.__mro__:
        if klass.__module__.startswith("aiohttp") and method in vars(klass):
            monkeypatch.delattr(klass, method)
    with pytest.raises(aiohttp_compat.AiohttpIncompatible, match=rf"ResponseHandler\.{method}"):
        aiohttp_compat.check()


def test_compat_aiohttp_read_timeout_parameter_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    def set_response_params(self: object, *, timeout: float | None = None) -> None:
        pass

    monkeypatch.setattr(ResponseHandler, "set_response_params", set_response_params)
    with pytest.raises(aiohttp_compat.AiohttpIncompatible, match=r"read_timeout="):
        aiohttp_compat.check()


def test_compat_aiohttp_protocol_overrides_only_what_is_checked() -> None:
    """relay's protocol overrides exactly the checked methods, and none of its own names
    (attributes, helpers) shadows one of aiohttp's: a clash would change aiohttp's behaviour
    without a word."""
    from relay.net.transports.aiohttp_transport import _Handler

    own = {name for name in vars(_Handler) if not name.startswith("__")}
    assert own & set(dir(ResponseHandler)) == set(aiohttp_compat.OVERRIDDEN)


def _names_of(cls: type) -> set[str]:
    """Every attribute name `cls`'s own methods assign on self, and its own class members."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    stored = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.ctx, ast.Store)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    }
    return stored | {name for name in vars(cls) if not name.startswith("__")}


def _names_used_by(cls: type, package: str) -> set[str]:
    """Every member and attribute name the dependency's own classes in `cls`'s MRO use."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] != package:
            continue
        for name, member in vars(klass).items():
            names.add(name)
            code = getattr(member, "__code__", None)
            if code is not None:
                names.update(code.co_names)
    return names


def test_compat_uvicorn_protocol_names_shadow_nothing_of_uvicorn() -> None:
    """relay's protocol overrides exactly the checked methods; its own attributes and helpers
    clash with no name uvicorn's protocol uses."""
    clash = _names_of(RelayHttpToolsProtocol) & _names_used_by(HttpToolsProtocol, "uvicorn")
    assert clash == set(uvicorn_compat.OVERRIDDEN)


def test_compat_aiohttp_protocol_attributes_shadow_nothing_of_aiohttp() -> None:
    from relay.net.transports.aiohttp_transport import _Handler

    clash = _names_of(_Handler) & _names_used_by(ResponseHandler, "aiohttp")
    assert clash == set(aiohttp_compat.OVERRIDDEN)
