"""What every compat module shares: the error relay refuses to start with when a dependency
lacks a private part relay relies on, and the checks that find those parts.

Each dependency whose private or undocumented API relay uses has one compat module
(`relay/net/httpx_compat.py`, `relay/net/transports/aiohttp_compat.py`,
`relay/server/uvicorn_compat.py`); nothing else
touches those parts. Each module's `check()` runs when it is imported, so a dependency that
renamed one fails relay's start with a message naming it, instead of silently switching a
guard or a bound off.
"""

from __future__ import annotations


class IncompatibleDependency(ImportError):
    """A dependency lacks a private part relay relies on."""

    #: Whose parts are missing, as a message says it ("aiohttp's ").
    owner = ""
    #: The installed versions, as a message names them ("aiohttp 3.14.5").
    installed = ""

    @classmethod
    def missing(cls, what: str) -> IncompatibleDependency:
        return cls(
            f"relay needs {cls.owner}{what}, missing in {cls.installed}; install a version "
            "relay supports (see pyproject.toml)"
        )

    @classmethod
    def require(cls, present: bool, what: str) -> None:
        if not present:
            raise cls.missing(what)


def assigned_in(cls: type, method: str, attribute: str) -> bool:
    """Whether `cls.<method>` names `attribute` (an instance attribute, which the class itself
    does not show, set or read there)."""
    function = getattr(cls, method, None)
    code = getattr(function, "__code__", None)
    return code is not None and attribute in code.co_names


def has_method(cls: type, name: str) -> bool:
    return callable(getattr(cls, name, None))


def defined_in_package(cls: type, name: str, package: str) -> bool:
    """Whether `package` itself (not a base class from elsewhere, such as asyncio.Protocol's
    empty defaults) defines the method `name` on `cls` or its bases."""
    return any(
        name in vars(klass) and callable(vars(klass)[name])
        for klass in cls.__mro__
        if klass.__module__.split(".")[0] == package
    )
