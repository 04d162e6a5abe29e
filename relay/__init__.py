"""relay: a streaming file-download relay.

The public names are exported lazily: `import relay` (and so `relay fetch`, which imports only
its own modules) loads neither Starlette, uvicorn nor aiohttp until `create_app` is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Config", "Route", "__version__", "create_app"]

if TYPE_CHECKING:
    from relay.config import Config, Route
    from relay.server.app import create_app

_LAZY = {"create_app": "relay.server.app", "Config": "relay.config", "Route": "relay.config"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'relay' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
