"""`relay fetch` is a small client: it must not pay for the server's dependencies."""

from __future__ import annotations

import json
import subprocess
import sys

SERVER_ONLY = ("starlette", "uvicorn", "aiohttp", "prometheus_client", "aiofiles")

_PROBE = """
import json, sys
from relay.cli import build_parser
from relay.fetch.fetcher import run_fetch  # what `relay fetch` runs
build_parser()
print(json.dumps(sorted({name.split(".")[0] for name in sys.modules})))
"""


def test_relay_fetch_imports_none_of_the_server_dependencies() -> None:
    """Loading the CLI and the downloader imports no server framework or network library
    beyond httpx; a probe that imported nothing at all would not list httpx, so it is checked."""
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(proc.stdout))
    assert "httpx" in loaded
    assert "relay" in loaded
    assert not loaded.intersection(SERVER_ONLY), loaded.intersection(SERVER_ONLY)


def test_package_exports_are_lazy_but_complete() -> None:
    import relay

    assert set(relay.__all__) == {"Config", "Route", "__version__", "create_app"}
    for name in relay.__all__:
        assert getattr(relay, name) is not None
