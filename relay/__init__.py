"""relay: a streaming file-download relay."""

from __future__ import annotations

__version__ = "0.1.0"

from relay.app import create_app
from relay.config import Config, Route

__all__ = ["Config", "Route", "__version__", "create_app"]
